use std::time::Duration;
use sluice_host_tests::*;

#[test]
fn smoke() {
    let module = FilterModule::load("sluice-probe").unwrap();
    println!("imports: {:?}", module.imports());
    let mut host = Host::with_workers(2);
    host.add_cluster(Cluster::fixed("backend", 200, "{\"hello\":1}", Duration::from_millis(20)));
    host.add_filter(PluginConfig::new(module)).unwrap();
    let r = host.send(Request::post_json("/v1/chat/completions", "{\"a\":1}").header("x-probe-id", "one"));
    println!("{} {:?}\n{}", r.status, r.headers, r.body_text());
    println!("{:?}", host.vm_failures());
    for l in host.logs() { println!("{:?}", l); }
}

//! A backend's zones in order of preference.

use crate::config::{FailoverConfig, LocalZone, Zone};

/// The zones a backend's requests may go to, best first, as indexes into
/// `zones`: the local zone (named by the policy, or the proxy's own,
/// `node_zone`, when `local_zone = "auto"`), then the policy's `order`,
/// then the rest of the local region, then the other regions when
/// `cross_region` allows them, each group in the policy's order. The local
/// region is the local zone's, else that of the first zone `order` names,
/// else the first zone's.
pub fn rank(zones: &[Zone], cfg: &FailoverConfig, node_zone: Option<&str>) -> Vec<usize> {
    let local_name = match &cfg.local_zone {
        LocalZone::Named(z) => Some(z.as_str()),
        LocalZone::Auto => node_zone,
    };
    let find = |name: &str| zones.iter().position(|z| z.name == name);
    let local = local_name.and_then(find);
    let named: Vec<usize> = cfg.order.iter().filter_map(|n| find(n)).collect();
    let region = local.or_else(|| named.first().copied()).map_or_else(
        || zones.first().map(|z| z.region.as_str()),
        |i| Some(zones[i].region.as_str()),
    );
    let mut out: Vec<usize> = Vec::with_capacity(zones.len());
    let push = |i: usize, out: &mut Vec<usize>| {
        let foreign = Some(zones[i].region.as_str()) != region;
        if !out.contains(&i) && (cfg.cross_region || !foreign) {
            out.push(i);
        }
    };
    if let Some(i) = local {
        push(i, &mut out);
    }
    for &i in &named {
        push(i, &mut out);
    }
    for (i, z) in zones.iter().enumerate() {
        if Some(z.region.as_str()) == region {
            push(i, &mut out);
        }
    }
    for i in 0..zones.len() {
        push(i, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::tests::{config, zone};

    fn cfg(local: LocalZone, order: &[&str], cross_region: bool) -> FailoverConfig {
        FailoverConfig {
            local_zone: local,
            order: order.iter().map(|s| s.to_string()).collect(),
            cross_region,
            ..config()
        }
    }

    #[test]
    fn local_then_order_then_region_then_the_world() {
        let zones = [
            zone("us-1a", "us"),
            zone("eu-1a", "eu"),
            zone("us-1b", "us"),
            zone("us-1c", "us"),
            zone("eu-1b", "eu"),
        ];
        let c = cfg(LocalZone::Auto, &["us-1c"], true);
        assert_eq!(rank(&zones, &c, Some("us-1b")), vec![2, 3, 0, 1, 4]);
        // Without a locality: the order's region leads.
        assert_eq!(rank(&zones, &c, None), vec![3, 0, 2, 1, 4]);
        // A named local zone wins over the proxy's.
        let c = cfg(LocalZone::Named("eu-1b".into()), &[], true);
        assert_eq!(rank(&zones, &c, Some("us-1b")), vec![4, 1, 0, 2, 3]);
        // Staying in the region drops the others.
        let c = cfg(LocalZone::Auto, &[], false);
        assert_eq!(rank(&zones, &c, Some("eu-1a")), vec![1, 4]);
        // A proxy zone the backend does not have: its first zone's region.
        assert_eq!(rank(&zones, &c, Some("ap-1a")), vec![0, 2, 3]);
        assert_eq!(rank(&[], &c, Some("ap-1a")), Vec::<usize>::new());
    }
}

//! `sluice package`: the OCI image layouts it writes, read back with the
//! image-spec types, and its refusals.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use oci_spec::image::{
    ANNOTATION_REF_NAME, ImageConfiguration, ImageIndex, ImageManifest, MediaType, OciLayout,
};
use sha2::{Digest as _, Sha256};

const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// A small valid core module: the header and one custom section whose payload
/// names the proxy-wasm ABI export, as sluice.wasm's export section does.
fn module() -> Vec<u8> {
    let name = b"sluice-test";
    let payload = b"proxy_abi_version_0_2_1";
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.push(0); // custom section
    bytes.push((1 + name.len() + payload.len()) as u8);
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    bytes
}

/// A fresh directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-package-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `sluice package` on `wasm` into `out`; its report as `{key: value}`.
fn package(wasm: &Path, out: &Path, extra: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec![
        "package",
        "--wasm",
        wasm.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = sluice(&args);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    text(&run.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A layout read back: its index, its one manifest and every blob by digest.
struct Layout {
    index: ImageIndex,
    manifest: ImageManifest,
    manifest_digest: String,
    blobs: HashMap<String, Vec<u8>>,
}

impl Layout {
    /// Reads `dir`, checking what every OCI layout must satisfy: the
    /// `oci-layout` version, blobs named by the sha256 of their content, and
    /// descriptors whose digest and size match a blob.
    fn read(dir: &Path) -> Self {
        let oci_layout = OciLayout::from_file(dir.join("oci-layout")).unwrap();
        assert_eq!(oci_layout.image_layout_version(), "1.0.0");
        let mut blobs = HashMap::new();
        for entry in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            assert_eq!(
                sha256_hex(&bytes),
                name,
                "blob {name} is not named by its sha256"
            );
            blobs.insert(format!("sha256:{name}"), bytes);
        }
        let index = ImageIndex::from_file(dir.join("index.json")).unwrap();
        assert_eq!(index.schema_version(), 2);
        assert_eq!(index.media_type(), &Some(MediaType::ImageIndex));
        let [entry] = index.manifests().as_slice() else {
            panic!("index.json lists {} manifests", index.manifests().len())
        };
        assert_eq!(entry.media_type(), &MediaType::ImageManifest);
        let manifest_digest = entry.digest().to_string();
        let manifest_bytes = &blobs[&manifest_digest];
        assert_eq!(entry.size(), manifest_bytes.len() as u64);
        let manifest = ImageManifest::from_reader(manifest_bytes.as_slice()).unwrap();
        assert_eq!(manifest.schema_version(), 2);
        assert_eq!(manifest.media_type(), &Some(MediaType::ImageManifest));
        let mut referenced = vec![manifest_digest.clone()];
        for d in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let digest = d.digest().to_string();
            let blob = blobs
                .get(&digest)
                .unwrap_or_else(|| panic!("{digest} is referenced but not in blobs/"));
            assert_eq!(d.size(), blob.len() as u64, "size of {digest}");
            referenced.push(digest);
        }
        let mut stored: Vec<_> = blobs.keys().cloned().collect();
        stored.sort();
        referenced.sort();
        referenced.dedup();
        assert_eq!(
            stored, referenced,
            "blobs/ holds exactly what is referenced"
        );
        Self {
            index,
            manifest,
            manifest_digest,
            blobs,
        }
    }

    fn blob(&self, digest: &impl ToString) -> &[u8] {
        &self.blobs[&digest.to_string()]
    }

    fn ref_name(&self) -> Option<&str> {
        self.index.manifests()[0]
            .annotations()
            .as_ref()?
            .get(ANNOTATION_REF_NAME)
            .map(String::as_str)
    }
}

#[test]
fn the_wasm_variant_is_the_runtime_config_then_the_raw_module() {
    let dir = scratch("wasm");
    let wasm = dir.join("sluice.wasm");
    std::fs::write(&wasm, module()).unwrap();
    let report = package(&wasm, &dir.join("oci"), &["--tag", "1.2.3"]);
    let layout = Layout::read(&dir.join("oci/wasm"));

    assert_eq!(layout.ref_name(), Some("1.2.3"));
    let config = layout.manifest.config();
    assert_eq!(config.media_type(), &MediaType::Other(WASM_CONFIG.into()));
    let media: Vec<String> = layout
        .manifest
        .layers()
        .iter()
        .map(|l| l.media_type().to_string())
        .collect();
    // Istio takes this variant only with exactly these two layers.
    assert_eq!(media, [WASM_CONFIG, WASM_LAYER]);
    let [runtime, content] = layout.manifest.layers().as_slice() else {
        unreachable!()
    };
    assert_eq!(runtime.digest(), config.digest());
    assert_eq!(layout.blob(content.digest()), module().as_slice());
    let runtime_config: serde_json::Value =
        serde_json::from_slice(layout.blob(config.digest())).unwrap();
    assert_eq!(runtime_config["type"], "envoy_proxy");
    assert_eq!(
        runtime_config["abiVersions"],
        serde_json::json!(["proxy_abi_version_0_2_1"])
    );
    assert_eq!(
        runtime_config["config"]["rootIds"],
        serde_json::json!(["sluice", "sluice.attempt"])
    );

    // The report names these digests.
    assert_eq!(report["module-sha256"], sha256_hex(&module()));
    assert_eq!(report["wasm-layer"], content.digest().to_string());
    assert_eq!(
        report["wasm-layer"],
        format!("sha256:{}", report["module-sha256"])
    );
    assert_eq!(report["wasm-manifest"], layout.manifest_digest);
}

#[test]
fn the_compat_variant_is_an_ordinary_image_holding_plugin_wasm() {
    let dir = scratch("compat");
    let wasm = dir.join("sluice.wasm");
    std::fs::write(&wasm, module()).unwrap();
    let report = package(&wasm, &dir.join("oci"), &["--tag", "t"]);
    let layout = Layout::read(&dir.join("oci/compat"));

    assert_eq!(layout.ref_name(), Some("t"));
    assert_eq!(
        layout
            .manifest
            .annotations()
            .as_ref()
            .and_then(|a| a.get("module.wasm.image/variant"))
            .map(String::as_str),
        Some("compat")
    );
    assert_eq!(
        layout.manifest.config().media_type(),
        &MediaType::ImageConfig
    );
    let [layer] = layout.manifest.layers().as_slice() else {
        panic!("the compat variant has one layer")
    };
    assert_eq!(layer.media_type(), &MediaType::ImageLayerGzip);
    assert_eq!(
        layer.media_type().to_string(),
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(layout.blob(layer.digest()))
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let config =
        ImageConfiguration::from_reader(layout.blob(layout.manifest.config().digest())).unwrap();
    assert_eq!(config.rootfs().typ(), "layers");
    assert_eq!(
        config.rootfs().diff_ids(),
        &[format!("sha256:{}", sha256_hex(&tar_bytes))]
    );
    assert_eq!(config.architecture().to_string(), "wasm");
    assert_eq!(config.os().to_string(), "wasip1");
    assert_eq!(config.created(), &None, "no timestamp in the config");

    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header();
        assert_eq!(header.mtime().unwrap(), 0);
        assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
        assert_eq!(header.mode().unwrap(), 0o644);
        let name = entry.path().unwrap().to_str().unwrap().to_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        files.insert(name, data);
    }
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["plugin.wasm", "runtime-config.json"]
    );
    assert_eq!(files["plugin.wasm"], module());

    assert_eq!(report["compat-manifest"], layout.manifest_digest);
    assert_eq!(report["compat-layer"], layer.digest().to_string());
}

#[test]
fn two_runs_give_identical_digests_and_bytes() {
    let dir = scratch("deterministic");
    let wasm = dir.join("sluice.wasm");
    std::fs::write(&wasm, module()).unwrap();
    let first = package(&wasm, &dir.join("one"), &[]);
    let second = package(&wasm, &dir.join("two"), &[]);
    for key in [
        "module-sha256",
        "wasm-manifest",
        "wasm-layer",
        "compat-manifest",
        "compat-layer",
    ] {
        assert_eq!(first[key], second[key], "{key}");
    }
    for variant in ["wasm", "compat"] {
        let one = Layout::read(&dir.join("one").join(variant));
        let two = Layout::read(&dir.join("two").join(variant));
        assert_eq!(one.blobs, two.blobs, "{variant}: blobs differ between runs");
        assert_eq!(
            std::fs::read(dir.join("one").join(variant).join("index.json")).unwrap(),
            std::fs::read(dir.join("two").join(variant).join("index.json")).unwrap()
        );
    }
    // Packaging again over an existing layout replaces it: same digests, no stale blobs.
    let again = package(&wasm, &dir.join("one"), &["--tag", "other"]);
    assert_eq!(again["wasm-manifest"], first["wasm-manifest"]);
    assert_eq!(
        Layout::read(&dir.join("one/wasm")).ref_name(),
        Some("other")
    );
}

#[test]
fn variant_selects_the_layouts_written() {
    let dir = scratch("variant");
    let wasm = dir.join("sluice.wasm");
    std::fs::write(&wasm, module()).unwrap();
    let report = package(&wasm, &dir.join("oci"), &["--variant", "compat"]);
    assert!(dir.join("oci/compat/index.json").is_file());
    assert!(!dir.join("oci/wasm").exists());
    assert!(report.contains_key("compat-manifest") && !report.contains_key("wasm-manifest"));
    // The default tag is the CLI's version.
    assert_eq!(
        Layout::read(&dir.join("oci/compat")).ref_name(),
        Some(env!("CARGO_PKG_VERSION"))
    );
}

/// `sluice package` with `input` as the module (none: a missing file):
/// (exit code, stderr, the output directory).
fn refused(test: &str, input: Option<&[u8]>, extra: &[&str]) -> (Option<i32>, String, PathBuf) {
    let dir = scratch(test);
    let wasm = dir.join("input.wasm");
    if let Some(bytes) = input {
        std::fs::write(&wasm, bytes).unwrap();
    }
    let out = dir.join("oci");
    let mut args = vec![
        "package",
        "--wasm",
        wasm.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = sluice(&args);
    (run.status.code(), text(&run.stderr), out)
}

#[test]
fn a_missing_module_is_a_clear_error() {
    let (code, stderr, out) = refused("missing", None, &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read the module"), "{stderr}");
    assert!(stderr.contains("input.wasm"), "{stderr}");
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn a_file_that_is_not_wasm_is_refused_by_its_magic() {
    let (code, stderr, out) = refused("not-wasm", Some(b"name = \"policy\"\n"), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("is not a WebAssembly module"), "{stderr}");
    assert!(stderr.contains(r"\0asm"), "{stderr}");
    assert!(stderr.contains("bytes 6e 61 6d 65"), "{stderr}");
    assert!(!out.exists(), "nothing is written");

    let (code, stderr, _) = refused("empty", Some(b""), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("found the end of the file"), "{stderr}");
}

#[test]
fn a_component_or_truncated_header_is_not_a_core_module() {
    // A component model binary: the magic, then version 0x0d and layer 1.
    let (code, stderr, _) = refused("component", Some(b"\0asm\x0d\0\x01\0"), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("not a core WebAssembly module"), "{stderr}");
    let (code, stderr, _) = refused("truncated", Some(b"\0asm"), &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("the end of the file"), "{stderr}");
}

#[test]
fn a_bad_tag_is_refused() {
    let (code, stderr, out) = refused("tag", Some(&module()), &["--tag", "v1:latest"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("invalid tag `v1:latest`"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn a_directory_that_is_not_a_layout_is_not_replaced() {
    let dir = scratch("not-a-layout");
    let wasm = dir.join("sluice.wasm");
    std::fs::write(&wasm, module()).unwrap();
    let keep = dir.join("oci/wasm/notes.txt");
    std::fs::create_dir_all(keep.parent().unwrap()).unwrap();
    std::fs::write(&keep, "mine").unwrap();
    let run = sluice(&[
        "package",
        "--wasm",
        wasm.to_str().unwrap(),
        "--out",
        dir.join("oci").to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(1));
    assert!(
        text(&run.stderr).contains("is not an OCI image layout"),
        "{}",
        text(&run.stderr)
    );
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "mine");
}

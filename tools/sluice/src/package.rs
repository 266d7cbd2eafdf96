//! `sluice package`: `sluice.wasm` as OCI image layouts that a registry, skopeo
//! and Istio's `WasmPlugin` (`url: oci://...`) take, built without Docker.
//!
//! Istio's agent accepts two image shapes (its `pkg/wasm/imagefetcher.go`),
//! and each has users: registries and scanners that only know container images
//! take the *compat* variant, tools of the Wasm ecosystem the *artifact* one.
//! So both are written, each as its own layout (`OUT/wasm`, `OUT/compat`):
//!
//! - **wasm** (the "oci" variant of the Wasm image spec): config and first
//!   layer the runtime config (`application/vnd.module.wasm.config.v1+json`),
//!   second layer the raw module (`application/vnd.module.wasm.content.layer.v1+wasm`).
//!   Istio requires exactly two layers here: an image whose only layer is the
//!   raw module is refused ("number of layers must be 2").
//! - **compat**: an ordinary image (OCI image config with platform and
//!   `rootfs.diff_ids`), one `application/vnd.oci.image.layer.v1.tar+gzip`
//!   layer holding `plugin.wasm` (and `runtime-config.json`), and the manifest
//!   annotation `module.wasm.image/variant=compat` that the spec asks for.
//!
//! Everything is deterministic, so a digest names a build of the module and
//! nothing else: no timestamps (the image config has no `created`, tar entries
//! have mtime 0, uid/gid 0, no user names; the gzip header has no mtime or
//! name), fixed compression level, and at most one annotation per map (the
//! `oci-spec` types keep annotations in a `HashMap`, whose order would change
//! from run to run with two keys).
//!
//! Which digest goes where: Envoy's `remote` code source and a `WasmPlugin`
//! with an `http(s)://` url check the sha256 of the module itself; a
//! `WasmPlugin` with an `oci://` url checks the image's *manifest* digest.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    ANNOTATION_REF_NAME, ANNOTATION_TITLE, Arch, Descriptor, DescriptorBuilder, Digest,
    ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType,
    OciLayoutBuilder, Os, RootFsBuilder, SCHEMA_VERSION, Sha256Digest,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use sluice_policy::{ATTEMPT_ROOT_ID, MODULE};

/// Media type of the Wasm runtime config (config and first layer of the artifact variant).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
/// Media type of the raw module layer of the artifact variant.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// Manifest annotation that marks a compat-variant image.
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
/// The module's file name inside the compat layer (what Istio looks for).
pub const COMPAT_MODULE_FILE: &str = "plugin.wasm";
/// The runtime config's file name inside the compat layer and as a layer title.
pub const RUNTIME_CONFIG_FILE: &str = "runtime-config.json";

/// The first bytes of every WebAssembly binary module: `\0asm`.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// The version that follows the magic in a core module (a component has another).
const WASM_VERSION_1: &[u8; 4] = &[1, 0, 0, 0];

/// `sluice package` arguments.
#[derive(Args)]
pub struct PackageArgs {
    /// The module to package (`cargo xtask build` writes
    /// target/wasm32-wasip1/release/sluice.wasm).
    #[arg(long, value_name = "PATH")]
    pub wasm: PathBuf,
    /// Directory of the layouts: DIR/wasm and DIR/compat, each an OCI image
    /// layout (a previous layout there is replaced).
    #[arg(long, value_name = "DIR", default_value = "target/oci")]
    pub out: PathBuf,
    /// The tag (`org.opencontainers.image.ref.name` in index.json), so that
    /// `skopeo copy oci:DIR/wasm:TAG docker://...` finds the image.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub tag: String,
    /// Which image variant(s) to write.
    #[arg(long, value_enum, default_value_t = VariantChoice::Both)]
    pub variant: VariantChoice,
}

/// The `--variant` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VariantChoice {
    /// The Wasm artifact variant only.
    Wasm,
    /// The Docker-compatible variant only.
    Compat,
    /// Both, each in its own layout.
    Both,
}

impl VariantChoice {
    fn variants(self) -> &'static [Variant] {
        match self {
            Self::Wasm => &[Variant::Wasm],
            Self::Compat => &[Variant::Compat],
            Self::Both => &[Variant::Wasm, Variant::Compat],
        }
    }
}

/// One image shape Istio accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Runtime config + raw module layers, Wasm media types.
    Wasm,
    /// An ordinary image: one tar+gzip layer holding `plugin.wasm`.
    Compat,
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wasm => "wasm",
            Self::Compat => "compat",
        })
    }
}

/// Why an input cannot be packaged.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read the module {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a WebAssembly module: it does not start with the magic bytes `\\0asm` \
         (found {found})"
    )]
    NotWasm { path: PathBuf, found: String },
    #[error(
        "{path} is not a core WebAssembly module (version 1): after `\\0asm` come {found}; \
         proxy-wasm hosts load core modules only"
    )]
    NotCoreModule { path: PathBuf, found: String },
    #[error(
        "invalid tag `{0}`: a tag is 1 to 128 characters of [A-Za-z0-9_.-], \
         not starting with `.` or `-`"
    )]
    BadTag(String),
    #[error("{0} exists and is not an OCI image layout (no `oci-layout` file): not replacing it")]
    NotALayout(PathBuf),
}

/// The runtime config of the Wasm image spec (`application/vnd.module.wasm.config.v1+json`).
///
/// Istio does not read it; it tells a person or a tool which host the module
/// is for and which root ids it registers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeConfig {
    #[serde(rename = "type")]
    runtime: &'static str,
    abi_versions: Vec<&'static str>,
    config: EnvoyRuntimeConfig,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvoyRuntimeConfig {
    root_ids: [&'static str; 2],
}

/// The proxy-wasm ABI versions a module can declare (each is an exported
/// function of that name).
const ABI_VERSIONS: &[&str] = &[
    "proxy_abi_version_0_1_0",
    "proxy_abi_version_0_2_0",
    "proxy_abi_version_0_2_1",
];

impl RuntimeConfig {
    fn for_module(module: &[u8]) -> Self {
        // A byte search rather than a parse of the export section: the names
        // are distinctive, and a false positive would only add a version to
        // metadata that no host checks.
        let abi_versions = ABI_VERSIONS
            .iter()
            .copied()
            .filter(|name| contains(module, name.as_bytes()))
            .collect();
        Self {
            runtime: "envoy_proxy",
            abi_versions,
            config: EnvoyRuntimeConfig {
                root_ids: [MODULE, ATTEMPT_ROOT_ID],
            },
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A blob of a layout: its bytes and its descriptor's digest.
struct Blob {
    bytes: Vec<u8>,
    digest: Digest,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> anyhow::Result<Self> {
        let digest = sha256_digest(&bytes)?;
        Ok(Self { bytes, digest })
    }

    fn descriptor(
        &self,
        media_type: MediaType,
        annotation: Option<(&str, &str)>,
    ) -> anyhow::Result<Descriptor> {
        let mut builder = DescriptorBuilder::default()
            .media_type(media_type)
            .digest(self.digest.clone())
            .size(self.bytes.len() as u64);
        if let Some((key, value)) = annotation {
            builder = builder.annotations(HashMap::from([(key.to_owned(), value.to_owned())]));
        }
        Ok(builder.build()?)
    }
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_digest(bytes: &[u8]) -> anyhow::Result<Digest> {
    let hex: Sha256Digest = sha256_hex(bytes).parse()?;
    Ok(hex.into())
}

/// What one variant's layout holds, for the report.
pub struct Packaged {
    pub layout: PathBuf,
    /// Digest of the image manifest (what `oci://` WasmPlugins check).
    pub manifest: Digest,
    /// Digest of the layer that carries the module.
    pub module_layer: Digest,
}

/// `sluice package`.
pub fn package(args: &PackageArgs) -> anyhow::Result<ExitCode> {
    check_tag(&args.tag)?;
    let module = read_module(&args.wasm)?;
    let module_sha256 = sha256_hex(&module);
    println!(
        "module {} ({} bytes)\nmodule-sha256 {module_sha256}",
        args.wasm.display(),
        module.len()
    );
    for &variant in args.variant.variants() {
        let layout = args.out.join(variant.to_string());
        let done = write_layout(&layout, variant, &module, &args.tag)?;
        println!(
            "{variant}-layout {} (oci:{}:{})\n{variant}-manifest {}\n{variant}-layer {}",
            done.layout.display(),
            done.layout.display(),
            args.tag,
            done.manifest,
            done.module_layer
        );
    }
    println!(
        "# WasmPlugin sha256: module-sha256 for an http(s):// url (and Envoy's remote code \
         source); the manifest digest's hex for an oci:// url"
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads a module and checks that it is a core WebAssembly module.
pub fn read_module(path: &Path) -> Result<Vec<u8>, InputError> {
    let bytes = std::fs::read(path).map_err(|source| InputError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let describe = |range: std::ops::Range<usize>| {
        let got = &bytes[range.start.min(bytes.len())..range.end.min(bytes.len())];
        if got.is_empty() {
            "the end of the file".to_owned()
        } else {
            let hex: Vec<String> = got.iter().map(|b| format!("{b:02x}")).collect();
            format!("bytes {}", hex.join(" "))
        }
    };
    if !bytes.starts_with(WASM_MAGIC) {
        return Err(InputError::NotWasm {
            path: path.to_owned(),
            found: describe(0..4),
        });
    }
    if bytes.get(4..8) != Some(WASM_VERSION_1.as_slice()) {
        return Err(InputError::NotCoreModule {
            path: path.to_owned(),
            found: describe(4..8),
        });
    }
    Ok(bytes)
}

/// A tag as registries accept it (the distribution spec's tag grammar).
fn check_tag(tag: &str) -> Result<(), InputError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(InputError::BadTag(tag.to_owned()))
    }
}

/// Writes one variant's image layout at `dir` (replacing a layout there).
pub fn write_layout(
    dir: &Path,
    variant: Variant,
    module: &[u8],
    tag: &str,
) -> anyhow::Result<Packaged> {
    let runtime_config = Blob::new(serde_json::to_vec(&RuntimeConfig::for_module(module))?)?;
    let mut blobs = Vec::new();
    let (manifest, module_layer) = match variant {
        Variant::Wasm => {
            let wasm = Blob::new(module.to_vec())?;
            let config_media = MediaType::Other(WASM_CONFIG_MEDIA_TYPE.to_owned());
            let manifest = ImageManifestBuilder::default()
                .schema_version(SCHEMA_VERSION)
                .media_type(MediaType::ImageManifest)
                .config(runtime_config.descriptor(config_media.clone(), None)?)
                .layers(vec![
                    runtime_config
                        .descriptor(config_media, Some((ANNOTATION_TITLE, RUNTIME_CONFIG_FILE)))?,
                    wasm.descriptor(
                        MediaType::Other(WASM_LAYER_MEDIA_TYPE.to_owned()),
                        Some((ANNOTATION_TITLE, &format!("{MODULE}.wasm"))),
                    )?,
                ])
                .build()?;
            let layer = wasm.digest.clone();
            blobs.push(runtime_config);
            blobs.push(wasm);
            (manifest, layer)
        }
        Variant::Compat => {
            let tar = compat_tar(module, &runtime_config.bytes)?;
            let diff_id = sha256_digest(&tar)?;
            let layer = Blob::new(gzip(&tar)?)?;
            let image_config = ImageConfigurationBuilder::default()
                .architecture(Arch::Wasm)
                .os(Os::Other("wasip1".to_owned()))
                .rootfs(
                    RootFsBuilder::default()
                        .typ("layers")
                        .diff_ids(vec![diff_id.to_string()])
                        .build()?,
                )
                .build()?;
            let config = Blob::new(image_config.to_string()?.into_bytes())?;
            let manifest = ImageManifestBuilder::default()
                .schema_version(SCHEMA_VERSION)
                .media_type(MediaType::ImageManifest)
                .config(config.descriptor(MediaType::ImageConfig, None)?)
                .layers(vec![layer.descriptor(MediaType::ImageLayerGzip, None)?])
                .annotations(HashMap::from([(
                    VARIANT_ANNOTATION.to_owned(),
                    "compat".to_owned(),
                )]))
                .build()?;
            let digest = layer.digest.clone();
            blobs.push(config);
            blobs.push(layer);
            (manifest, digest)
        }
    };
    let manifest = Blob::new(manifest.to_string()?.into_bytes())?;
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest.descriptor(
            MediaType::ImageManifest,
            Some((ANNOTATION_REF_NAME, tag)),
        )?])
        .build()?;
    let oci_layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()?;

    prepare_dir(dir)?;
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir)
        .with_context(|| format!("cannot create {}", blob_dir.display()))?;
    let manifest_digest = manifest.digest.clone();
    blobs.push(manifest);
    for blob in &blobs {
        write_file(&blob_dir.join(blob.digest.digest()), &blob.bytes)?;
    }
    write_file(&dir.join("oci-layout"), oci_layout.to_string()?.as_bytes())?;
    write_file(&dir.join("index.json"), index.to_string()?.as_bytes())?;
    Ok(Packaged {
        layout: dir.to_owned(),
        manifest: manifest_digest,
        module_layer,
    })
}

/// The compat layer, uncompressed: `plugin.wasm` and `runtime-config.json`
/// with fixed metadata, so the same module gives the same bytes.
fn compat_tar(module: &[u8], runtime_config: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in [
        (COMPAT_MODULE_FILE, module),
        (RUNTIME_CONFIG_FILE, runtime_config),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        builder.append_data(&mut header, name, data)?;
    }
    Ok(builder.into_inner()?)
}

/// gzip without a name or mtime in its header, at a fixed level.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

/// Makes `dir` an empty directory, replacing an OCI layout there but nothing else.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            if !dir.join("oci-layout").is_file() {
                return Err(InputError::NotALayout(dir.to_owned()).into());
            }
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove the old layout {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_distribution_grammar() {
        for good in ["0.1.0", "latest", "v1_2-rc.3", &"a".repeat(128)] {
            assert!(check_tag(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "-x", "a:b", "a/b", "é", &"a".repeat(129)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runtime_config_lists_only_the_abi_versions_the_module_exports() {
        let config = RuntimeConfig::for_module(b"\0asm\x01\0\0\0..proxy_abi_version_0_2_1..");
        assert_eq!(config.abi_versions, ["proxy_abi_version_0_2_1"]);
        assert!(
            RuntimeConfig::for_module(b"\0asm\x01\0\0\0")
                .abi_versions
                .is_empty()
        );
    }

    #[test]
    fn the_gzip_header_carries_no_time_and_no_name() {
        let gz = gzip(b"x").unwrap();
        // RFC 1952: ID1 ID2 CM FLG MTIME(4) ...; FLG 0 means no FNAME/FCOMMENT.
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0]);
    }
}

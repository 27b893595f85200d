//! Container images on the host: a docker-save tarball, an OCI image layout (a
//! directory or a tar of one), or a plain root directory.
//!
//! Images are unpacked once into a cache keyed by the digest of their config, with
//! every blob's digest checked on the way, and reused by later runs.

pub mod cache;
mod source;
pub mod unpack;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use source::Source;

/// Largest manifest, index or config blob read into memory.
const MAX_METADATA: u64 = 4 << 20;
/// Most bytes an image may unpack to, all layers together: a compressed layer is
/// small on the wire, and a decompression bomb must not fill the host's disk.
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;
/// How deep nested OCI indexes may go.
const MAX_INDEX_DEPTH: usize = 4;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no such file or directory")]
    Missing(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: digest mismatch (want {want}, got {got})")]
    Digest { what: String, want: String, got: String },
    #[error("layer {digest} uses {media_type}, which moat cannot unpack (only tar and tar+gzip)")]
    UnsupportedLayer { digest: String, media_type: String },
    #[error("cannot apply layer {layer}")]
    Layer {
        layer: String,
        #[source]
        source: unpack::UnpackError,
    },
}

/// What the image asks of a container (the `config` object of the image config).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// An image ready to be a container's root.
#[derive(Debug)]
pub struct Image {
    /// The unpacked root directory (in the cache, or the plain directory given).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// `sha256:<hex>` of the image config; None for a plain directory.
    pub digest: Option<String>,
    /// This call unpacked the image into the cache (it was not there before).
    pub unpacked: bool,
    /// Keeps a cached image from being pruned while this lives.
    pub lease: Option<cache::Lease>,
}

impl Image {
    /// True if `rootfs` is the user's own directory rather than a cached unpack.
    pub fn is_plain_dir(&self) -> bool {
        self.digest.is_none()
    }
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ImageConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
}

/// One layer to apply: where it is, its expected digests, and how it is packed.
struct Layer {
    name: String,
    /// Expected digest of the blob as stored (OCI); None for docker-save files.
    blob_digest: Option<(String, u64)>,
    /// Expected digest of the uncompressed tar (the config's diff_ids).
    diff_id: Option<String>,
    compression: Option<Compression>,
}

/// An image's metadata, read and verified, before any layer is touched.
struct Plan {
    config_digest: String,
    config: ImageConfig,
    layers: Vec<Layer>,
}

/// Makes `image` usable as a root: a plain directory is used as is; anything else is
/// unpacked into `cache_dir` (once per config digest).
pub fn prepare(image: &Path, cache_dir: &Path) -> Result<Image, ImageError> {
    let meta = std::fs::metadata(image).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::Missing(image.to_path_buf()),
        _ => ImageError::Io { what: format!("cannot read image {}", image.display()), source: e },
    })?;
    let source = if meta.is_dir() {
        let is_image = ["oci-layout", "index.json", "manifest.json"].iter().any(|f| image.join(f).exists());
        if !is_image {
            return Ok(Image { rootfs: image.to_path_buf(), config: ImageConfig::default(), digest: None, unpacked: false, lease: None });
        }
        Source::Dir(image.to_path_buf())
    } else if meta.is_file() {
        Source::tar(image)?
    } else {
        // A FIFO or a device would block or never end.
        return Err(ImageError::Invalid(format!("{} is neither a regular file nor a directory", image.display())));
    };
    let plan = plan(&source, image)?;
    let label = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf()).display().to_string();
    let (rootfs, lease, unpacked) =
        cache::unpack_cached(cache_dir, &plan.config_digest, &label, |dst| apply_all(&source, &plan.layers, dst))?;
    Ok(Image { rootfs, config: plan.config, digest: Some(plan.config_digest), unpacked, lease: Some(lease) })
}

/// Keeps the image cache `dir` within `cap_mib` (0: no limit) by removing the least
/// recently used images no run is using; `moat run` calls it after unpacking a new
/// image. Failures are logged: a full cache must not fail the run that filled it.
pub fn enforce_cache_cap(dir: &Path, cap_mib: u64) {
    if cap_mib == 0 {
        return;
    }
    let cap = cap_mib.saturating_mul(1 << 20);
    match cache::prune(dir, cache::Prune::ToCap(cap)) {
        Ok(report) => {
            for i in &report.removed {
                log::info!("image cache {}: evicted {} ({}) to stay within image_cache_mib={cap_mib}", dir.display(), i.digest, cache::human_size(i.bytes));
            }
            let left = report.kept.iter().fold(0u64, |t, i| t.saturating_add(i.bytes));
            if left > cap {
                log::warn!(
                    "image cache {} holds {}, above image_cache_mib={cap_mib}: the images left are in use",
                    dir.display(),
                    cache::human_size(left)
                );
            }
        }
        Err(e) => log::warn!("image cache {}: cannot evict unused images: {}", dir.display(), crate::error_chain(&e)),
    }
}

fn plan(source: &Source, image: &Path) -> Result<Plan, ImageError> {
    if source.exists("index.json") {
        plan_oci(source)
    } else if source.exists("manifest.json") {
        plan_docker(source)
    } else {
        Err(ImageError::Invalid(format!(
            "{} is neither a docker-save archive (manifest.json) nor an OCI image layout (index.json)",
            image.display()
        )))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json { what: what.to_string(), source })
}

/// `sha256:<64 hex>` -> the hex; anything else is refused.
fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) => Ok(h),
        _ => Err(ImageError::Invalid(format!("unsupported or malformed digest {digest:?} (want sha256:<64 hex>)"))),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a small blob by descriptor and checks its size and digest.
fn read_blob(source: &Source, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let h = digest_hex(&d.digest)?;
    let bytes = source.read_small(&format!("blobs/sha256/{h}"), MAX_METADATA)?;
    let got = sha256_hex(&bytes);
    if got != h || bytes.len() as u64 != d.size {
        return Err(ImageError::Digest { what: format!("blob {}", d.digest), want: d.digest.clone(), got: format!("sha256:{got}") });
    }
    Ok(bytes)
}

fn plan_oci(source: &Source) -> Result<Plan, ImageError> {
    let mut index: Index = parse_json("index.json", &source.read_small("index.json", MAX_METADATA)?)?;
    let mut what = "index.json".to_string();
    for _ in 0..MAX_INDEX_DEPTH {
        if let Some(config) = &index.config {
            return plan_oci_manifest(source, config, index.layers.as_deref().unwrap_or_default(), &what);
        }
        let manifests = index.manifests.take().unwrap_or_default();
        let chosen = pick_manifest(&manifests).ok_or_else(|| ImageError::Invalid(format!("{what} lists no linux/amd64 image")))?;
        what = format!("manifest {}", chosen.digest);
        let bytes = read_blob(source, chosen)?;
        index = parse_json(&what, &bytes)?;
        if index.media_type.is_empty() {
            index.media_type = chosen.media_type.clone();
        }
    }
    Err(ImageError::Invalid(format!("OCI indexes nest more than {MAX_INDEX_DEPTH} deep")))
}

/// The one manifest of an index, or the linux/amd64 one among several.
fn pick_manifest(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let amd64 = |d: &&Descriptor| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64");
    if let Some(d) = manifests.iter().find(amd64) {
        return Some(d);
    }
    // Without platforms (a single-image layout), take the one manifest, skipping
    // attestation-style entries that name another platform.
    let unplatformed: Vec<&Descriptor> = manifests.iter().filter(|d| d.platform.is_none()).collect();
    match unplatformed[..] {
        [one] => Some(one),
        _ => manifests.iter().find(|d| d.platform.is_none()),
    }
}

fn plan_oci_manifest(source: &Source, config: &Descriptor, layers: &[Descriptor], what: &str) -> Result<Plan, ImageError> {
    let config_bytes = read_blob(source, config)?;
    let blob: ConfigBlob = parse_json(&format!("image config {}", config.digest), &config_bytes)?;
    let diff_ids = diff_ids(&blob, layers.len(), what)?;
    let mut planned = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate() {
        let h = digest_hex(&l.digest)?;
        let mt = l.media_type.as_str();
        let compression = if mt.ends_with(".tar+gzip") || mt.ends_with(".tar.gzip") {
            Compression::Gzip
        } else if mt.ends_with(".tar") {
            Compression::None
        } else {
            return Err(ImageError::UnsupportedLayer { digest: l.digest.clone(), media_type: l.media_type.clone() });
        };
        planned.push(Layer {
            name: format!("blobs/sha256/{h}"),
            blob_digest: Some((l.digest.clone(), l.size)),
            diff_id: diff_ids.get(i).cloned(),
            compression: Some(compression),
        });
    }
    Ok(Plan { config_digest: config.digest.clone(), config: blob.config.unwrap_or_default(), layers: planned })
}

fn diff_ids(blob: &ConfigBlob, layers: usize, what: &str) -> Result<Vec<String>, ImageError> {
    let ids = blob.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    if ids.len() != layers {
        return Err(ImageError::Invalid(format!("{what} has {layers} layers but its config lists {} diff_ids", ids.len())));
    }
    for id in &ids {
        digest_hex(id)?;
    }
    Ok(ids)
}

fn plan_docker(source: &Source) -> Result<Plan, ImageError> {
    let manifests: Vec<DockerManifest> = parse_json("manifest.json", &source.read_small("manifest.json", MAX_METADATA)?)?;
    let m = match &manifests[..] {
        [one] => one,
        [] => return Err(ImageError::Invalid("manifest.json lists no image".into())),
        more => return Err(ImageError::Invalid(format!("the archive holds {} images; save one image per archive", more.len()))),
    };
    let config_bytes = source.read_small(&m.config, MAX_METADATA)?;
    let got = sha256_hex(&config_bytes);
    // The config's file name is its digest (`<hex>.json` or `blobs/sha256/<hex>`).
    let stem = Path::new(&m.config).file_name().map(|f| f.to_string_lossy().trim_end_matches(".json").to_string()).unwrap_or_default();
    if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && stem != got {
        return Err(ImageError::Digest { what: format!("image config {}", m.config), want: format!("sha256:{stem}"), got: format!("sha256:{got}") });
    }
    let blob: ConfigBlob = parse_json(&format!("image config {}", m.config), &config_bytes)?;
    let diff_ids = diff_ids(&blob, m.layers.len(), "manifest.json")?;
    let layers = m
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(name, id)| Layer { name: name.clone(), blob_digest: None, diff_id: Some(id), compression: None })
        .collect();
    Ok(Plan { config_digest: format!("sha256:{got}"), config: blob.config.unwrap_or_default(), layers })
}

/// Reads through `R`, hashing and counting what passes.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing { inner, hasher: Sha256::new(), count: 0 }
    }
    fn finish(self) -> (String, u64) {
        (format!("sha256:{}", hex(&self.hasher.finalize())), self.count)
    }
}

/// Reads through `R`, failing once more than `left` bytes (shared across layers) passed.
struct Capped<'a, R> {
    inner: R,
    left: &'a mut u64,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        *self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other(format!("the image unpacks to more than {MAX_IMAGE_BYTES} bytes"))
        })?;
        Ok(n)
    }
}

/// What an image may unpack to, over all its layers.
#[derive(Clone, Copy, Debug)]
struct Caps {
    bytes: u64,
    entries: usize,
}

const CAPS: Caps = Caps { bytes: MAX_IMAGE_BYTES, entries: unpack::MAX_IMAGE_ENTRIES };

fn apply_all(source: &Source, layers: &[Layer], root: &Path) -> Result<(), ImageError> {
    apply_all_capped(source, layers, root, CAPS)
}

fn apply_all_capped(source: &Source, layers: &[Layer], root: &Path, caps: Caps) -> Result<(), ImageError> {
    let mut left = caps.bytes;
    let mut entries = unpack::EntryBudget::new(caps.entries);
    for layer in layers {
        let label = layer.blob_digest.as_ref().map(|(d, _)| d.clone()).unwrap_or_else(|| layer.name.clone());
        let compression = match layer.compression {
            Some(c) => c,
            None => sniff(source, &layer.name, &label)?,
        };
        let (reader, _) = source.open(&layer.name)?;
        let io_err = |source| ImageError::Io { what: format!("cannot read layer {label}"), source };
        let mut blob = Hashing::new(reader);
        let diff = {
            let decoded: Box<dyn Read> = match compression {
                Compression::None => Box::new(&mut blob),
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut blob)),
            };
            let mut diff = Hashing::new(Capped { inner: decoded, left: &mut left });
            unpack::apply_layer(root, &mut diff, &mut entries).map_err(|source| ImageError::Layer { layer: label.clone(), source })?;
            // The tar's end marker may come before the end of the stream: hash it all.
            std::io::copy(&mut diff, &mut std::io::sink()).map_err(io_err)?;
            diff.finish().0
        };
        std::io::copy(&mut blob, &mut std::io::sink()).map_err(io_err)?;
        let (blob_digest, blob_size) = blob.finish();
        if let Some((want, size)) = &layer.blob_digest {
            if *want != blob_digest || *size != blob_size {
                return Err(ImageError::Digest { what: format!("layer {label}"), want: want.clone(), got: blob_digest });
            }
        }
        if let Some(want) = &layer.diff_id {
            if *want != diff {
                return Err(ImageError::Digest { what: format!("uncompressed layer {label}"), want: want.clone(), got: diff });
            }
        }
    }
    Ok(())
}

/// docker-save layers carry no media type: look at the first bytes.
fn sniff(source: &Source, name: &str, label: &str) -> Result<Compression, ImageError> {
    let (r, _) = source.open(name)?;
    let mut magic = Vec::with_capacity(4);
    r.take(4).read_to_end(&mut magic).map_err(|source| ImageError::Io { what: format!("cannot read layer {label}"), source })?;
    match magic[..] {
        [0x1f, 0x8b, ..] => Ok(Compression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd] => Err(ImageError::UnsupportedLayer { digest: label.to_string(), media_type: "zstd".into() }),
        _ => Ok(Compression::None),
    }
}

#[cfg(test)]
mod tests;

//! containerd's config file (`/etc/containerd/config.toml`) as far as moat cares: does
//! it register the runtime `moat` (type `io.containerd.moat.v2`) for the CRI plugin,
//! and adding that registration without touching anything else in the file.
//!
//! Two shapes exist. Config version 2 (containerd 1.x, still read by 2.x, which
//! migrates it when loading) puts CRI runtimes under
//! `plugins."io.containerd.grpc.v1.cri".containerd.runtimes`; version 3 (containerd
//! 2.x only) under `plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes`.
//! `ctr run --runtime io.containerd.moat.v2` and Docker need none of this: containerd
//! finds `containerd-shim-moat-v2` on its PATH from the runtime type alone.

use std::path::{Path, PathBuf};

/// The name Kubernetes' RuntimeClass `handler` and `crictl --runtime` use.
pub const RUNTIME_NAME: &str = "moat";
/// The runtime type; containerd turns it into the binary name containerd-shim-moat-v2.
pub const RUNTIME_TYPE: &str = "io.containerd.moat.v2";
/// The pod annotations the CRI plugin must pass to moat (the shim's `io.moat.*` keys).
pub const POD_ANNOTATIONS: &str = "io.moat.*";
/// Where containerd reads its config unless started with `--config`.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// A containerd config file version moat knows how to extend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigVersion {
    /// `version = 2`: containerd 1.x (and 2.x, which migrates it).
    V2,
    /// `version = 3`: containerd 2.x.
    V3,
}

/// Why containerd's config could not be read, checked or extended.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("containerd {0}.x is not supported (moat knows containerd 1.x and 2.x)")]
    UnsupportedContainerd(u64),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: invalid TOML: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{path}: `version` must be an integer, got {value}")]
    BadVersion { path: PathBuf, value: String },
    #[error(
        "{path} has no `version` line, so containerd reads it as a version 1 config, which moat does not \
         extend; add `version = {wanted}` at its top (check its sections with `containerd config migrate`) and retry"
    )]
    NoVersion { path: PathBuf, wanted: u8 },
    #[error("{path} is a version {file} config but containerd {containerd}.x needs version {wanted}; migrate it (containerd config migrate) or pass the right --version")]
    VersionMismatch { path: PathBuf, file: i64, containerd: u64, wanted: u8 },
    #[error("{path} already defines runtime `{RUNTIME_NAME}` at {table} differently ({found}); fix or remove that entry by hand")]
    Conflict { path: PathBuf, table: String, found: String },
    #[error("{path}: appending the moat runtime would not register it (its CRI sections use a shape moat cannot extend: {reason}); add it by hand:\n{snippet}")]
    CannotAppend { path: PathBuf, reason: String, snippet: String },
}

impl ConfigVersion {
    /// The config version a containerd of major version `major` writes.
    pub fn for_containerd(major: u64) -> Result<ConfigVersion, ContainerdConfigError> {
        match major {
            1 => Ok(ConfigVersion::V2),
            2 => Ok(ConfigVersion::V3),
            n => Err(ContainerdConfigError::UnsupportedContainerd(n)),
        }
    }

    /// The `version = N` value.
    pub fn number(self) -> u8 {
        match self {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
        }
    }

    /// The CRI plugin that holds the runtimes.
    pub fn cri_plugin(self) -> &'static str {
        match self {
            ConfigVersion::V2 => "io.containerd.grpc.v1.cri",
            ConfigVersion::V3 => "io.containerd.cri.v1.runtime",
        }
    }

    /// The runtime's table header, as containerd's own configs write it.
    pub fn table(self) -> String {
        match self {
            ConfigVersion::V2 => format!("plugins.\"{}\".containerd.runtimes.{RUNTIME_NAME}", self.cri_plugin()),
            ConfigVersion::V3 => format!("plugins.'{}'.containerd.runtimes.{RUNTIME_NAME}", self.cri_plugin()),
        }
    }

    /// The lines that register moat's runtime for CRI. `pod_annotations` lets a pod's
    /// `io.moat.*` annotations (its VM size) through: the CRI plugin passes a pod's
    /// annotations to the runtime only if they match that list, and drops the others
    /// without a word.
    pub fn snippet(self) -> String {
        format!(
            "# moat: each pod in its own KVM microVM (containerd-shim-moat-v2 must be on containerd's PATH)\n\
             [{}]\n  runtime_type = \"{RUNTIME_TYPE}\"\n  pod_annotations = [\"{POD_ANNOTATIONS}\"]\n",
            self.table()
        )
    }
}

/// The major version in `containerd --version` output, e.g. "containerd
/// github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1" or "containerd
/// containerd.io v2.1.4 abc123": the first word that looks like a version.
pub fn parse_containerd_version(output: &str) -> Option<(u64, String)> {
    output.split_whitespace().find_map(|w| {
        let v = w.strip_prefix('v').unwrap_or(w);
        let (major, rest) = v.split_once('.')?;
        let major = major.parse::<u64>().ok()?;
        rest.starts_with(|c: char| c.is_ascii_digit()).then(|| (major, w.to_string()))
    })
}

/// Whether the CRI runtime `moat` is registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// No runtime `moat` in the file's shape.
    Absent,
    /// `moat` with `runtime_type = "io.containerd.moat.v2"`.
    Registered,
    /// `moat` exists but is something else (what it is, for the message).
    Different(String),
}

/// What one containerd config file says, as far as moat cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileState {
    /// Its `version`, if it has one.
    pub version: Option<i64>,
    /// It has no keys at all (empty, or comments only).
    pub empty: bool,
    /// The runtime in the shape of `version` (nothing if the version is unknown).
    pub moat: Registration,
    /// `disabled_plugins` turns the CRI plugin off (Docker's containerd.io package does).
    pub cri_disabled: bool,
}

/// Parses `text` (the contents of `path`, which only names it in errors).
pub fn inspect(path: &Path, text: &str) -> Result<FileState, ContainerdConfigError> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| ContainerdConfigError::Parse {
        path: path.to_path_buf(),
        line: e.span().map_or(1, |s| text.as_bytes().iter().take(s.start).filter(|&&b| b == b'\n').count() + 1),
        // toml's message may span lines; a report line must not.
        message: e.message().trim().lines().map(str::trim).collect::<Vec<_>>().join("; "),
    })?;
    let version = match doc.get("version") {
        None => None,
        Some(toml::Value::Integer(n)) => Some(*n),
        Some(other) => return Err(ContainerdConfigError::BadVersion { path: path.to_path_buf(), value: other.to_string() }),
    };
    let shape = match version {
        Some(2) => Some(ConfigVersion::V2),
        Some(3) => Some(ConfigVersion::V3),
        _ => None,
    };
    let moat = match shape {
        Some(v) => registration(&doc, v),
        None => Registration::Absent,
    };
    let cri_disabled = doc.get("disabled_plugins").and_then(toml::Value::as_array).is_some_and(|a| {
        a.iter().filter_map(toml::Value::as_str).any(|p| {
            matches!(p, "cri" | "io.containerd.grpc.v1.cri" | "io.containerd.cri.v1.runtime")
        })
    });
    Ok(FileState { version, empty: doc.is_empty(), moat, cri_disabled })
}

fn registration(doc: &toml::Table, v: ConfigVersion) -> Registration {
    let rt = ["plugins", v.cri_plugin(), "containerd", "runtimes", RUNTIME_NAME]
        .iter()
        .try_fold(None::<&toml::Value>, |cur, key| match cur {
            None => doc.get(*key).map(Some),
            Some(val) => val.get(*key).map(Some),
        })
        .flatten();
    match rt {
        None => Registration::Absent,
        Some(toml::Value::Table(t)) => match t.get("runtime_type") {
            Some(toml::Value::String(s)) if s == RUNTIME_TYPE => Registration::Registered,
            Some(other) => Registration::Different(format!("runtime_type = {other}")),
            None => Registration::Different("no runtime_type".into()),
        },
        Some(other) => Registration::Different(format!("not a table: {other}")),
    }
}

/// Reads and inspects `path`; `None` if it does not exist.
pub fn inspect_file(path: &Path) -> Result<Option<FileState>, ContainerdConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => inspect(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ContainerdConfigError::Read { path: path.to_path_buf(), source }),
    }
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The file did not exist (or had no keys) and now holds `version` and the runtime.
    Created(ConfigVersion),
    /// The runtime was registered already; the file is unchanged.
    AlreadyRegistered,
    /// The snippet was appended; the old file is at `backup`.
    Appended { version: ConfigVersion, backup: PathBuf },
}

/// The backup [`apply`] writes before changing `path`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".moat-backup");
    PathBuf::from(s)
}

/// Registers the runtime in the containerd config `path` for a containerd of major
/// version `containerd_major`. Existing content is never changed, only appended to,
/// and only after a copy of it was written to [`backup_path`].
pub fn apply(path: &Path, containerd_major: u64) -> Result<Applied, ContainerdConfigError> {
    let wanted = ConfigVersion::for_containerd(containerd_major)?;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(ContainerdConfigError::Read { path: path.to_path_buf(), source }),
    };
    let state = match &text {
        Some(t) => Some(inspect(path, t)?),
        None => None,
    };
    let write = |p: &Path, contents: &str| {
        std::fs::write(p, contents).map_err(|source| ContainerdConfigError::Write { path: p.to_path_buf(), source })
    };
    let (text, state) = match (text, state) {
        (Some(text), Some(state)) if !(state.empty && state.version.is_none()) => (text, state),
        (old, _) => {
            // Nothing to keep but comments: a fresh file, after a backup of those.
            let mut new = String::new();
            if let Some(old) = &old {
                write(&backup_path(path), old)?;
                new.push_str(old);
                if !new.is_empty() && !new.ends_with('\n') {
                    new.push('\n');
                }
            } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|source| ContainerdConfigError::Write { path: dir.to_path_buf(), source })?;
            }
            // `version` must come before any table, so it goes above the old comments.
            let new = format!("version = {}\n{new}\n{}", wanted.number(), wanted.snippet());
            write(path, &new)?;
            return Ok(Applied::Created(wanted));
        }
    };
    let version = match state.version {
        None => return Err(ContainerdConfigError::NoVersion { path: path.to_path_buf(), wanted: wanted.number() }),
        // containerd 2.x still reads version 2 files (it migrates them when loading).
        Some(2) => ConfigVersion::V2,
        Some(3) if wanted == ConfigVersion::V3 => ConfigVersion::V3,
        Some(n) => {
            return Err(ContainerdConfigError::VersionMismatch {
                path: path.to_path_buf(),
                file: n,
                containerd: containerd_major,
                wanted: wanted.number(),
            })
        }
    };
    match state.moat {
        Registration::Registered => return Ok(Applied::AlreadyRegistered),
        Registration::Different(found) => {
            return Err(ContainerdConfigError::Conflict { path: path.to_path_buf(), table: version.table(), found })
        }
        Registration::Absent => {}
    }
    let mut new = text.clone();
    if !new.ends_with('\n') {
        new.push('\n');
    }
    new.push('\n');
    new.push_str(&version.snippet());
    // Appending a table can clash with how the file wrote its CRI sections (an inline
    // table, a dotted key): check the result before touching the file.
    let cannot = |reason: String| ContainerdConfigError::CannotAppend {
        path: path.to_path_buf(),
        reason,
        snippet: version.snippet(),
    };
    match inspect(path, &new) {
        Ok(s) if s.moat == Registration::Registered => {}
        Ok(s) => return Err(cannot(format!("the result reads as {:?}", s.moat))),
        Err(ContainerdConfigError::Parse { message, .. }) => return Err(cannot(message)),
        Err(e) => return Err(e),
    }
    let backup = backup_path(path);
    write(&backup, &text)?;
    write(path, &new)?;
    Ok(Applied::Appended { version, backup })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("etc/containerd/config.toml");
        (d, p)
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).expect("read")
    }

    #[test]
    fn containerd_versions_parse() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n";
        assert_eq!(parse_containerd_version(debian), Some((1, "1.6.20~ds1".into())));
        let upstream = "containerd github.com/containerd/containerd/v2 v2.1.4 75cb2b7193e4e490e9fbdc236c0e811ccaba3376\n";
        assert_eq!(parse_containerd_version(upstream), Some((2, "v2.1.4".into())));
        assert_eq!(parse_containerd_version("containerd containerd.io 1.7.27 05044ec0"), Some((1, "1.7.27".into())));
        assert_eq!(parse_containerd_version("no version here"), None);
        assert_eq!(parse_containerd_version(""), None);
    }

    #[test]
    fn snippets_are_the_cri_shapes() {
        for v in [ConfigVersion::V2, ConfigVersion::V3] {
            let file = format!("version = {}\n{}", v.number(), v.snippet());
            let s = inspect(Path::new("x"), &file).expect("snippet parses");
            assert_eq!(s.moat, Registration::Registered, "{file}");
            let doc: toml::Table = toml::from_str(&file).expect("valid");
            let moat = &doc["plugins"][v.cri_plugin()]["containerd"]["runtimes"][RUNTIME_NAME];
            let passed = moat["pod_annotations"].as_array().expect("pod_annotations is a list");
            assert_eq!(passed.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>(), ["io.moat.*"], "{file}");
        }
        assert_eq!(POD_ANNOTATIONS, format!("{}*", crate::oci::MOAT_ANNOTATION_PREFIX), "the keys the shim reads");
        assert!(ConfigVersion::V2.snippet().contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]"));
        assert!(ConfigVersion::V3.snippet().contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.moat]"));
        assert!(matches!(ConfigVersion::for_containerd(3), Err(ContainerdConfigError::UnsupportedContainerd(3))));
    }

    #[test]
    fn absent_file_is_created_with_its_version() {
        for (major, version) in [(1, 2), (2, 3)] {
            let (_d, p) = tmp();
            assert_eq!(apply(&p, major).expect("apply"), Applied::Created(ConfigVersion::for_containerd(major).expect("v")));
            let text = read(&p);
            assert!(text.starts_with(&format!("version = {version}\n")), "{text}");
            let s = inspect(&p, &text).expect("parses");
            assert_eq!((s.version, s.moat), (Some(version), Registration::Registered));
            assert!(!backup_path(&p).exists());
            assert_eq!(apply(&p, major).expect("again"), Applied::AlreadyRegistered);
            assert_eq!(read(&p), text, "a second apply changes nothing");
        }
    }

    #[test]
    fn comments_only_file_keeps_its_comments() {
        let (_d, p) = tmp();
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(&p, "# my notes").expect("write");
        assert_eq!(apply(&p, 1).expect("apply"), Applied::Created(ConfigVersion::V2));
        let text = read(&p);
        assert!(text.starts_with("version = 2\n# my notes\n"), "{text}");
        assert_eq!(read(&backup_path(&p)), "# my notes");
        assert_eq!(inspect(&p, &text).expect("parses").moat, Registration::Registered);
    }

    const V2_WITH_RUNC: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
"#;

    #[test]
    fn v2_file_with_other_runtimes_gets_moat_appended() {
        let (_d, p) = tmp();
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(&p, V2_WITH_RUNC).expect("write");
        assert_eq!(inspect_file(&p).expect("inspect").expect("exists").moat, Registration::Absent);
        let applied = apply(&p, 1).expect("apply");
        assert_eq!(applied, Applied::Appended { version: ConfigVersion::V2, backup: backup_path(&p) });
        let text = read(&p);
        assert!(text.starts_with(V2_WITH_RUNC), "existing content kept as it was");
        assert_eq!(read(&backup_path(&p)), V2_WITH_RUNC);
        let doc: toml::Table = toml::from_str(&text).expect("valid");
        let runtimes = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(runtimes["runc"]["options"]["SystemdCgroup"].as_bool(), Some(true));
        assert_eq!(runtimes["moat"]["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(apply(&p, 1).expect("again"), Applied::AlreadyRegistered);
        assert_eq!(read(&p), text);
        // containerd 2.x loads version 2 files too: the version 2 shape is right there.
        std::fs::write(&p, V2_WITH_RUNC).expect("write");
        assert!(matches!(apply(&p, 2).expect("apply for 2.x"), Applied::Appended { version: ConfigVersion::V2, .. }));
    }

    #[test]
    fn version_mismatch_is_refused() {
        let (_d, p) = tmp();
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n";
        std::fs::write(&p, v3).expect("write");
        let e = apply(&p, 1).expect_err("containerd 1.x cannot read version 3");
        assert!(matches!(e, ContainerdConfigError::VersionMismatch { file: 3, containerd: 1, wanted: 2, .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert_eq!(read(&p), v3, "untouched");
        assert!(!backup_path(&p).exists());
        std::fs::write(&p, "root = \"/var/lib/containerd\"\n").expect("write");
        let e = apply(&p, 1).expect_err("no version = version 1");
        assert!(e.to_string().contains("no `version` line") && e.to_string().contains("version = 2"), "{e}");
        std::fs::write(&p, "version = \"2\"\n").expect("write");
        assert!(matches!(apply(&p, 1), Err(ContainerdConfigError::BadVersion { .. })));
    }

    #[test]
    fn garbage_toml_names_file_and_line() {
        let (_d, p) = tmp();
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        let bad = "version = 2\n\n[plugins\nfoo = 1\n";
        std::fs::write(&p, bad).expect("write");
        let e = apply(&p, 1).expect_err("garbage");
        let msg = e.to_string();
        assert!(matches!(e, ContainerdConfigError::Parse { line: 3, .. }), "{msg}");
        assert!(msg.starts_with(&format!("{} line 3: invalid TOML", p.display())), "{msg}");
        assert_eq!(read(&p), bad, "untouched");
    }

    #[test]
    fn a_different_moat_runtime_is_not_overwritten() {
        let (_d, p) = tmp();
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        let other = "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.moat]\n  runtime_type = 'io.containerd.kata.v2'\n";
        std::fs::write(&p, other).expect("write");
        let e = apply(&p, 2).expect_err("conflict");
        assert!(e.to_string().contains("io.containerd.kata.v2"), "{e}");
        assert_eq!(read(&p), other);
    }

    #[test]
    fn an_inline_runtimes_table_is_not_broken() {
        let (_d, p) = tmp();
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        let inline = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  runtimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
        std::fs::write(&p, inline).expect("write");
        let e = apply(&p, 1).expect_err("cannot append to an inline table");
        assert!(matches!(e, ContainerdConfigError::CannotAppend { .. }), "{e}");
        assert!(e.to_string().contains("runtime_type = \"io.containerd.moat.v2\""), "the message has the snippet: {e}");
        assert_eq!(read(&p), inline);
        assert!(!backup_path(&p).exists());
    }

    #[test]
    fn disabled_cri_is_seen() {
        let s = inspect(Path::new("x"), "disabled_plugins = [\"cri\"]\n").expect("parses");
        assert!(s.cri_disabled);
        assert_eq!(s.version, None);
        assert!(!inspect(Path::new("x"), "version = 2\ndisabled_plugins = []\n").expect("parses").cri_disabled);
    }
}

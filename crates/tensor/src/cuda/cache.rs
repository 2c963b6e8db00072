//! The on-disk PTX cache: compiling every kernel file with NVRTC takes seconds, so each PTX is
//! kept under a key made of the file name, the architecture and a hash of the exact source and
//! compile options. Any edit to a kernel, the prelude or the options gives a new key; stale
//! entries are never read (they are only left behind, and can be deleted at any time).
//!
//! Where: `$RLHF_PTX_CACHE` if set, else `$XDG_CACHE_HOME/rlhf/ptx`, else `~/.cache/rlhf/ptx`.
//! `RLHF_PTX_CACHE` also lets a machine without NVRTC use PTX compiled elsewhere (a GPU
//! session can carry a cache filled by `tools/check-kernels`).
//!
//! Writes are atomic (temporary file in the same folder, then rename), so concurrent processes
//! and interrupted writes never leave a half-written entry under a real name. Each entry starts
//! with a comment line naming its key, checked on read.

use super::arch::Arch;
use crate::{Error, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// FNV-1a, 64-bit: a stable hash (std's hashers may change between Rust releases, and the
/// cache outlives a toolchain upgrade). A collision needs the same file name and arch as well.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so ("ab", "c") and ("a", "bc") hash differently.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache key of one compiled kernel file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxKey {
    /// The kernel file's stem (`gemm`).
    pub name: String,
    pub arch: Arch,
    /// fnv1a64 of the full source (prelude included) and the compile options.
    pub hash: u64,
}

impl PtxKey {
    pub fn new(name: &str, arch: Arch, source: &str, options: &[String]) -> PtxKey {
        let mut parts: Vec<&[u8]> = vec![source.as_bytes()];
        parts.extend(options.iter().map(|o| o.as_bytes()));
        PtxKey {
            name: name.to_string(),
            arch,
            hash: fnv1a64(&parts),
        }
    }

    fn file_name(&self) -> String {
        format!("{}-{}-{:016x}.ptx", self.name, self.arch, self.hash)
    }

    fn header(&self) -> String {
        format!(
            "// rlhf ptx cache: {} {} {:016x}\n",
            self.name, self.arch, self.hash
        )
    }
}

/// A folder of cached PTX files.
#[derive(Clone, Debug)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> PtxCache {
        PtxCache { dir: dir.into() }
    }

    /// The default location (see the module docs); None when no home folder is known.
    pub fn default_dir() -> Option<PathBuf> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(d) = var("RLHF_PTX_CACHE") {
            return Some(PathBuf::from(d));
        }
        if let Some(d) = var("XDG_CACHE_HOME") {
            return Some(Path::new(&d).join("rlhf").join("ptx"));
        }
        var("HOME").map(|h| Path::new(&h).join(".cache").join("rlhf").join("ptx"))
    }

    /// The cache at the default location, if there is one.
    pub fn at_default() -> Option<PtxCache> {
        PtxCache::default_dir().map(PtxCache::new)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `key`'s entry lives.
    pub fn path(&self, key: &PtxKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The cached PTX for `key`, or None when absent or not a valid entry for this key (a
    /// foreign or damaged file is treated as a miss and overwritten by the next store).
    pub fn load(&self, key: &PtxKey) -> Option<String> {
        let text = fs::read_to_string(self.path(key)).ok()?;
        let body = text.strip_prefix(&key.header())?;
        if body.is_empty() || body.contains('\0') {
            return None;
        }
        Some(body.to_string())
    }

    /// Stores `ptx` under `key` atomically: written to a temporary file in the cache folder,
    /// flushed to disk, then renamed over the final name.
    pub fn store(&self, key: &PtxKey, ptx: &str) -> Result<PathBuf> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| Error::Io { path, err }
        };
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let dest = self.path(key);
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            key.file_name(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(key.header().as_bytes())?;
            f.write_all(ptx.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &dest)
        };
        write().map_err(|err| {
            let _ = fs::remove_file(&tmp);
            Error::Io {
                path: dest.clone(),
                err,
            }
        })?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str) -> PtxKey {
        PtxKey::new(
            "gemm",
            Arch::parse("sm_90").unwrap(),
            src,
            &["-O3".to_string()],
        )
    }

    #[test]
    fn fnv_matches_published_vectors_and_separates_parts() {
        // FNV-1a 64 of "" and "a" (the published test vectors), before our part separator.
        let raw = |s: &[u8]| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &b in s {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            h
        };
        assert_eq!(raw(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(raw(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        assert_eq!(fnv1a64(&[b"x"]), fnv1a64(&[b"x"]));
    }

    #[test]
    fn key_depends_on_source_arch_and_options() {
        let a = key("src");
        assert_ne!(a.hash, key("src ").hash);
        let other_arch = PtxKey::new(
            "gemm",
            Arch::parse("sm_80").unwrap(),
            "src",
            &["-O3".into()],
        );
        assert_ne!(a.file_name(), other_arch.file_name());
        let other_opts = PtxKey::new(
            "gemm",
            Arch::parse("sm_90").unwrap(),
            "src",
            &["-O2".into()],
        );
        assert_ne!(a.hash, other_opts.hash);
    }

    #[test]
    fn store_then_load_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("nested/ptx"));
        let k = key("source one");
        assert_eq!(cache.load(&k), None);
        let ptx = ".version 9.0\n.target sm_90\n.visible .entry k()\n{\n ret;\n}\n";
        let path = cache.store(&k, ptx).unwrap();
        assert!(path.ends_with(k.file_name()));
        assert_eq!(cache.load(&k).as_deref(), Some(ptx));
        // A different source is a miss even though the file exists for the first.
        assert_eq!(cache.load(&key("source two")), None);
        // Overwriting works, and no temporary files are left behind.
        cache.store(&k, "// v2\n").unwrap();
        assert_eq!(cache.load(&k).as_deref(), Some("// v2\n"));
        let names: Vec<_> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [k.file_name()]);
    }

    #[test]
    fn damaged_or_foreign_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path());
        let k = key("s");
        std::fs::write(cache.path(&k), ".version 9.0\n").unwrap(); // no header
        assert_eq!(cache.load(&k), None);
        std::fs::write(cache.path(&k), k.header()).unwrap(); // header only
        assert_eq!(cache.load(&k), None);
        std::fs::write(cache.path(&k), format!("{}a\0b", k.header())).unwrap();
        assert_eq!(cache.load(&k), None);
    }

    #[test]
    fn store_into_an_unwritable_place_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not_a_dir");
        std::fs::write(&file, "x").unwrap();
        let cache = PtxCache::new(file.join("ptx"));
        assert!(cache.store(&key("s"), "ptx").is_err());
    }
}

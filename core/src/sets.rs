//! A job's checkpoints on disk: one directory per saved set, and one pointer file per role.
//!
//! ```text
//! dir/
//!   sets/000007-latest-e12-s720/   model.safetensors, model.optim.safetensors, model.json
//!   sets/000006-best-e11-s660/     model.safetensors, model.json
//!   latest                         "000007-latest-e12-s720"
//!   best                           "000006-best-e11-s660"
//! ```
//!
//! A set is written into a hidden directory (`sets/.partial-…`), every file fsynced and the
//! manifest last, then renamed to its final name; only then is the role's pointer replaced
//! (write a temporary file, fsync, rename, fsync the directory). Sets beyond the newest `keep`
//! of a role are removed after that, never the one a pointer names. So at every instant each
//! pointer is absent or names a complete set, and a crash at any point leaves the last complete
//! set of each role loadable. Sets are never modified once named, which lets readers (the
//! predictor, a download) read one without locks: a set removed under a reader is noticed as a
//! missing file and the reader follows the pointer again.

use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, CheckpointPaths, Manifest, atomic_write, model_file_step};
use crate::{Error, Result};

/// The file stem of the checkpoint inside a set.
const STEM: &str = "model";
const SETS: &str = "sets";
const PARTIAL: &str = ".partial-";

/// What a set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The best parameters by validation accuracy.
    Best,
    /// The most recent epoch, with optimizer state: where a restarted job continues.
    Latest,
}

impl Role {
    /// The pointer's file name, and the role's part of a set's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Best => "best",
            Self::Latest => "latest",
        }
    }
}

/// A set that could not be loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The set's name.
    pub set: String,
    /// What is wrong with it.
    pub problem: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint set {} is damaged: {}",
            self.set, self.problem
        )
    }
}

/// What [`CheckpointSets::recover`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The newest acceptable set that loads, with its name.
    pub loaded: Option<(String, Checkpoint)>,
    /// Newer sets of the role that did not load.
    pub damaged: Vec<Damage>,
    /// Whether the role had any set (or pointer) at all: when it had one and nothing loads,
    /// starting over would silently throw the job's progress away.
    pub existed: bool,
}

/// The checkpoint sets of one job, in `dir`.
#[derive(Debug, Clone)]
pub struct CheckpointSets {
    dir: PathBuf,
}

impl CheckpointSets {
    /// The sets kept in `dir` (created on the first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn sets_dir(&self) -> PathBuf {
        self.dir.join(SETS)
    }

    /// The directory of set `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.sets_dir().join(name)
    }

    /// The three file paths of set `name`.
    pub fn files(&self, name: &str) -> CheckpointPaths {
        CheckpointPaths::new(&self.path(name), STEM)
    }

    /// Writes `checkpoint` as a new set of `role`, points the role at it, and removes the role's
    /// sets beyond the newest `keep` (at least 1). Returns the set's name.
    pub fn save(&self, role: Role, checkpoint: &Checkpoint, keep: usize) -> Result<String> {
        let sets = self.sets_dir();
        fs::create_dir_all(&sets).map_err(|e| Error::io(&sets, e))?;
        let seq = self
            .names()?
            .iter()
            .filter_map(|n| seq_of(n))
            .max()
            .unwrap_or(0)
            + 1;
        let m = &checkpoint.manifest;
        let name = format!("{seq:06}-{}-e{}-s{}", role.as_str(), m.epoch, m.step);
        let partial = sets.join(format!("{PARTIAL}{name}"));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
        }
        checkpoint.save(&partial, STEM)?;
        let target = sets.join(&name);
        fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
        sync_dir(&sets)?;
        self.point(role, &name)?;
        // The set is saved once the pointer moved; pruning is housekeeping, retried next time.
        if let Err(e) = self.prune(role, keep.max(1)) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove old checkpoint sets");
        }
        Ok(name)
    }

    /// Points `role` at set `name` (atomically).
    pub fn point(&self, role: Role, name: &str) -> Result<()> {
        atomic_write(
            &self.dir.join(role.as_str()),
            format!("{name}\n").as_bytes(),
        )
    }

    /// Removes the role's pointer (the role then has no current set).
    pub fn unpoint(&self, role: Role) -> Result<()> {
        let path = self.dir.join(role.as_str());
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Converts checkpoints of the earlier layout (`latest.json`, `latest.safetensors`, … side by
    /// side in the job's directory) into sets, so a coordinator upgraded in place resumes its
    /// jobs and serves their models. Returns the roles converted; a legacy checkpoint that does
    /// not load is left where it is and reported by the error.
    pub fn migrate_legacy(&self, keep: usize) -> Result<Vec<Role>> {
        let mut done = Vec::new();
        for role in [Role::Latest, Role::Best] {
            let legacy = CheckpointPaths::new(&self.dir, role.as_str());
            if !legacy.manifest.exists() || self.current(role)?.is_some() {
                continue;
            }
            let checkpoint = Checkpoint::load(&self.dir, role.as_str())?;
            self.save(role, &checkpoint, keep)?;
            for file in [&legacy.manifest, &legacy.model, &legacy.optimizer] {
                if let Err(e) = fs::remove_file(file)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(Error::io(file, e));
                }
            }
            done.push(role);
        }
        Ok(done)
    }

    /// The set the role's pointer names, if any.
    pub fn current(&self, role: Role) -> Result<Option<String>> {
        let path = self.dir.join(role.as_str());
        match fs::read_to_string(&path) {
            Ok(s) => {
                let name = s.trim();
                let valid = !name.contains(['/', '\\'])
                    && !name.starts_with('.')
                    && seq_of(name).is_some()
                    && role_of(name) == Some(role);
                if !valid {
                    return Err(Error::checkpoint(&path, format!("bad pointer `{name}`")));
                }
                Ok(Some(name.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Loads set `name`.
    pub fn load(&self, name: &str) -> Result<Checkpoint> {
        Checkpoint::load(&self.path(name), STEM)
    }

    /// Loads the set the role's pointer names; `None` when it has none. A set replaced (and
    /// removed) while it is read is followed to its successor.
    pub fn load_current(&self, role: Role) -> Result<Option<(String, Checkpoint)>> {
        self.follow(role, |name| self.load(name))
    }

    /// The manifest (as written) and the parameter file of the role's current set, read as a
    /// pair from one set; `None` when it has none.
    pub fn read_current(&self, role: Role) -> Result<Option<(String, Vec<u8>)>> {
        Ok(self
            .follow(role, |name| {
                let files = self.files(name);
                let manifest = fs::read_to_string(&files.manifest)
                    .map_err(|e| Error::io(&files.manifest, e))?;
                let model = fs::read(&files.model).map_err(|e| Error::io(&files.model, e))?;
                let step = serde_json::from_str::<Manifest>(&manifest)
                    .map_err(|e| Error::checkpoint(&files.manifest, e.to_string()))?
                    .step;
                if model_file_step(&model) != Some(step) {
                    return Err(Error::checkpoint(
                        &files.model,
                        "does not belong with its manifest",
                    ));
                }
                Ok((manifest, model))
            })?
            .map(|(_, pair)| pair))
    }

    /// Reads the role's pointer and applies `read` to its set; when the set vanished (replaced
    /// meanwhile) and the pointer moved, tries again.
    fn follow<T>(
        &self,
        role: Role,
        read: impl Fn(&str) -> Result<T>,
    ) -> Result<Option<(String, T)>> {
        let mut last_err = None;
        for _ in 0..5 {
            let Some(name) = self.current(role)? else {
                return Ok(None);
            };
            match read(&name) {
                Ok(v) => return Ok(Some((name, v))),
                Err(Error::Io { source, path })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    if self.current(role)?.as_deref() == Some(name.as_str()) {
                        return Err(Error::Io { source, path });
                    }
                    last_err = Some(Error::Io { source, path });
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            Error::checkpoint(&self.dir, "the checkpoint kept changing while being read")
        }))
    }

    /// The newest set of `role` that loads and that `accept` takes: the pointer's set first,
    /// then older sets of the role, newest first. Sets that fail to load are reported in
    /// [`Recovered::damaged`]; sets `accept` refuses are skipped silently.
    pub fn recover(&self, role: Role, accept: impl Fn(&Manifest) -> bool) -> Result<Recovered> {
        let mut out = Recovered::default();
        let pointer = match self.current(role) {
            Ok(p) => p,
            Err(e) => {
                out.existed = true;
                out.damaged.push(Damage {
                    set: role.as_str().into(),
                    problem: e.to_string(),
                });
                None
            }
        };
        let mut candidates: Vec<String> = self
            .names()?
            .into_iter()
            .filter(|n| role_of(n) == Some(role))
            .collect();
        candidates.sort_by_key(|n| std::cmp::Reverse(seq_of(n)));
        if let Some(p) = &pointer {
            out.existed = true;
            // The pointer's set first; sets named after it (written, not yet pointed at, when a
            // crash came) are not trusted over it.
            let pointed_seq = seq_of(p);
            candidates.retain(|n| n != p && seq_of(n) < pointed_seq);
            candidates.insert(0, p.clone());
        }
        out.existed |= !candidates.is_empty();
        for name in candidates {
            match self.load(&name) {
                Ok(c) if accept(&c.manifest) => {
                    out.loaded = Some((name, c));
                    break;
                }
                Ok(_) => {}
                Err(e) => out.damaged.push(Damage {
                    set: name,
                    problem: e.to_string(),
                }),
            }
        }
        Ok(out)
    }

    /// The names of the complete sets (any role).
    pub fn names(&self) -> Result<Vec<String>> {
        let sets = self.sets_dir();
        let entries = match fs::read_dir(&sets) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&sets, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&sets, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && seq_of(&name).is_some() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes the role's sets beyond the newest `keep`, any set a pointer names excepted, and
    /// leftovers of interrupted writes.
    fn prune(&self, role: Role, keep: usize) -> Result<()> {
        let pinned: Vec<String> = [Role::Best, Role::Latest]
            .into_iter()
            .filter_map(|r| self.current(r).ok().flatten())
            .collect();
        let mut mine: Vec<String> = self
            .names()?
            .into_iter()
            .filter(|n| role_of(n) == Some(role))
            .collect();
        mine.sort_by_key(|n| std::cmp::Reverse(seq_of(n)));
        let sets = self.sets_dir();
        for name in mine.into_iter().skip(keep) {
            if !pinned.contains(&name) {
                // Out of sight first (one rename), so a crash mid-removal leaves no half set
                // under a set's name.
                let path = self.path(&name);
                let doomed = sets.join(format!("{PARTIAL}removed-{name}"));
                fs::rename(&path, &doomed).map_err(|e| Error::io(&path, e))?;
                sync_dir(&sets)?;
                fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
            }
        }
        for entry in fs::read_dir(&sets).map_err(|e| Error::io(&sets, e))? {
            let entry = entry.map_err(|e| Error::io(&sets, e))?;
            if entry.file_name().to_string_lossy().starts_with(PARTIAL) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }
}

fn seq_of(name: &str) -> Option<u64> {
    name.split('-').next()?.parse().ok()
}

fn role_of(name: &str) -> Option<Role> {
    match name.split('-').nth(1)? {
        "best" => Some(Role::Best),
        "latest" => Some(Role::Latest),
        _ => None,
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::Device;

    use super::*;
    use crate::checkpoint::FORMAT_VERSION;
    use crate::model::{ModelConfig, ModelKind, Params};

    fn ckpt(epoch: u64) -> Checkpoint {
        let model = ModelConfig {
            kind: ModelKind::RnnTanh,
            input_size: 1,
            hidden_size: 3,
            num_layers: 1,
            bidirectional: false,
            output_size: 1,
            head: Default::default(),
        };
        let params = Params::init(model, epoch, &Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
        Checkpoint {
            manifest: Manifest {
                format_version: FORMAT_VERSION,
                model,
                scale: 50.0,
                epoch,
                step: epoch * 10,
                validation: None,
                test: None,
                optimizer: None,
                scheduler: None,
                lr: None,
                position: BTreeMap::new(),
                normalizer: None,
                loss: Default::default(),
            },
            params,
            optimizer: None,
        }
    }

    #[test]
    fn pointers_follow_saves_and_old_sets_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let sets = CheckpointSets::new(dir.path());
        assert!(sets.load_current(Role::Latest).unwrap().is_none());
        let best = sets.save(Role::Best, &ckpt(1), 2).unwrap();
        for e in 1..=5 {
            sets.save(Role::Latest, &ckpt(e), 2).unwrap();
        }
        let (name, latest) = sets.load_current(Role::Latest).unwrap().unwrap();
        assert_eq!(latest.manifest.epoch, 5);
        assert!(name.contains("-latest-e5-s50"), "{name}");
        // Two latest sets are kept, and the best set though it is older.
        let names = sets.names().unwrap();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&best));
        let (_, b) = sets.load_current(Role::Best).unwrap().unwrap();
        assert_eq!(b, ckpt(1));
        let (manifest, model) = sets.read_current(Role::Best).unwrap().unwrap();
        assert!(manifest.contains("\"epoch\": 1"));
        assert_eq!(model_file_step(&model), Some(10));
    }

    #[test]
    fn a_damaged_set_falls_back_to_an_older_one_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sets = CheckpointSets::new(dir.path());
        for e in 1..=3 {
            sets.save(Role::Latest, &ckpt(e), 3).unwrap();
        }
        let newest = sets.current(Role::Latest).unwrap().unwrap();
        fs::write(sets.files(&newest).model, b"torn").unwrap();
        let r = sets.recover(Role::Latest, |_| true).unwrap();
        assert!(r.existed);
        let (name, c) = r.loaded.unwrap();
        assert_eq!(c.manifest.epoch, 2, "{name}");
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(r.damaged[0].set, newest);
        assert!(r.damaged[0].problem.contains("not a safetensors file"));
        // `accept` skips sets without calling them damaged.
        let r = sets.recover(Role::Latest, |m| m.epoch < 2).unwrap();
        assert_eq!(r.loaded.unwrap().1.manifest.epoch, 1);
        // Nothing at all: nothing existed.
        let empty = CheckpointSets::new(dir.path().join("none"));
        let r = empty.recover(Role::Latest, |_| true).unwrap();
        assert!(!r.existed && r.loaded.is_none() && r.damaged.is_empty());
    }

    #[test]
    fn every_crash_point_leaves_a_loadable_set() {
        let dir = tempfile::tempdir().unwrap();
        let sets = CheckpointSets::new(dir.path());
        sets.save(Role::Latest, &ckpt(1), 1).unwrap();
        // A crash while a set was being written: a partial directory, the pointer untouched.
        let partial = sets
            .sets_dir()
            .join(format!("{PARTIAL}000002-latest-e2-s20"));
        ckpt(2).save(&partial, STEM).unwrap();
        fs::remove_file(partial.join("model.json")).unwrap();
        let r = sets.recover(Role::Latest, |_| true).unwrap();
        assert_eq!(r.loaded.unwrap().1.manifest.epoch, 1);
        assert!(r.damaged.is_empty(), "{:?}", r.damaged);
        // A crash after the rename, before the pointer moved: the pointer's set still wins.
        ckpt(2)
            .save(&sets.path("000002-latest-e2-s20"), STEM)
            .unwrap();
        let r = sets.recover(Role::Latest, |_| true).unwrap();
        assert_eq!(r.loaded.unwrap().1.manifest.epoch, 1);
        // The next save continues after the stray set and clears the partial one.
        let name = sets.save(Role::Latest, &ckpt(3), 1).unwrap();
        assert!(name.starts_with("000003-"), "{name}");
        assert_eq!(sets.names().unwrap(), [name]);
        assert!(!partial.exists());
    }

    #[test]
    fn readers_never_fail_while_a_writer_replaces_sets() {
        let dir = tempfile::tempdir().unwrap();
        let sets = CheckpointSets::new(dir.path());
        sets.save(Role::Best, &ckpt(1), 1).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for e in 2..200 {
                    sets.save(Role::Best, &ckpt(e), 1).unwrap();
                }
                stop.store(true, std::sync::atomic::Ordering::Release);
            });
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        let (mut reads, mut last) = (0, 0);
                        while !stop.load(std::sync::atomic::Ordering::Acquire) {
                            let (_, c) = sets.load_current(Role::Best).unwrap().unwrap();
                            assert!(c.manifest.epoch >= last, "went back to an older set");
                            last = c.manifest.epoch;
                            let (manifest, _) = sets.read_current(Role::Best).unwrap().unwrap();
                            assert!(manifest.contains("\"epoch\""));
                            reads += 1;
                        }
                        reads
                    })
                })
                .collect();
            writer.join().unwrap();
            for r in readers {
                assert!(r.join().unwrap() > 0);
            }
        });
    }

    #[test]
    fn legacy_checkpoints_become_sets_and_bad_pointers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        ckpt(4).save(dir.path(), "latest").unwrap();
        ckpt(3).save(dir.path(), "best").unwrap();
        let sets = CheckpointSets::new(dir.path());
        assert_eq!(sets.migrate_legacy(3).unwrap(), [Role::Latest, Role::Best]);
        assert_eq!(sets.load_current(Role::Latest).unwrap().unwrap().1, ckpt(4));
        assert_eq!(sets.load_current(Role::Best).unwrap().unwrap().1, ckpt(3));
        assert!(!dir.path().join("latest.json").exists());
        assert!(sets.migrate_legacy(3).unwrap().is_empty(), "done once");
        // A pointer naming no set of its role is an error, not an empty role.
        fs::write(dir.path().join("latest"), "garbage\n").unwrap();
        assert!(sets.current(Role::Latest).is_err());
        let best = sets.current(Role::Best).unwrap().unwrap();
        fs::write(dir.path().join("latest"), format!("{best}\n")).unwrap();
        assert!(sets.current(Role::Latest).is_err());
    }

    #[test]
    fn a_reader_follows_a_set_replaced_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let sets = CheckpointSets::new(dir.path());
        sets.save(Role::Best, &ckpt(1), 1).unwrap();
        let first = sets.current(Role::Best).unwrap().unwrap();
        let calls = std::cell::Cell::new(0);
        let got = sets
            .follow(Role::Best, |name| {
                calls.set(calls.get() + 1);
                if calls.get() == 1 {
                    // The writer replaces the set between the pointer read and the file read.
                    sets.save(Role::Best, &ckpt(2), 1).unwrap();
                    assert!(!sets.path(&first).exists());
                }
                sets.load(name)
            })
            .unwrap()
            .unwrap();
        assert_eq!(got.1.manifest.epoch, 2);
        assert_eq!(calls.get(), 2);
    }
}

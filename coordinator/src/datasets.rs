//! Uploaded datasets on disk, by content hash, with parsed copies cached in memory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use recur_core::checkpoint::atomic_write;
use recur_core::data::{CsvLimits, Dataset, parse_csv};

use crate::ids::DatasetId;
use crate::{Error, Result};

/// The dataset directory.
#[derive(Debug)]
pub struct Datasets {
    dir: PathBuf,
    limits: CsvLimits,
    cache: Mutex<HashMap<DatasetId, Arc<Dataset>>>,
}

impl Datasets {
    /// Datasets under `dir` (created if missing).
    pub fn open(dir: PathBuf, limits: CsvLimits) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self {
            dir,
            limits,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, id: &DatasetId) -> PathBuf {
        self.dir.join(format!("{id}.csv"))
    }

    /// Validates `bytes` as CSV and stores them under `id`; returns the parsed rows.
    pub fn store(&self, id: &DatasetId, name: &str, bytes: &[u8]) -> Result<Arc<Dataset>> {
        let data = Arc::new(parse_csv(bytes, name, &self.limits).map_err(recur_core::Error::from)?);
        let path = self.path(id);
        if !path.exists() {
            atomic_write(&path, bytes)?;
        }
        self.cache_insert(id, &data);
        Ok(data)
    }

    /// The parsed dataset, from memory or disk.
    pub fn load(&self, id: &DatasetId) -> Result<Arc<Dataset>> {
        if let Some(d) = self.cache.lock().map_err(|_| poisoned())?.get(id) {
            return Ok(d.clone());
        }
        let path = self.path(id);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("dataset {id} not found; upload it first"))
            } else {
                Error::io(&path, e)
            }
        })?;
        let data = Arc::new(
            parse_csv(&bytes, &path.display().to_string(), &self.limits)
                .map_err(recur_core::Error::from)?,
        );
        self.cache_insert(id, &data);
        Ok(data)
    }

    /// Removes a dataset's file and its parsed copy; a missing file is not an error.
    pub fn remove(&self, id: &DatasetId) -> Result<()> {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(id);
        }
        let path = self.path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn cache_insert(&self, id: &DatasetId, data: &Arc<Dataset>) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(id.clone(), data.clone());
        }
    }
}

fn poisoned() -> Error {
    Error::Poisoned("dataset cache")
}

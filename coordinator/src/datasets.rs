//! Uploaded datasets on disk, by content hash, with parsed copies of row files cached in memory,
//! and the one place a job's data is made from one: [`Datasets::prepare`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use recur_core::checkpoint::atomic_write;
use recur_core::data::{
    CsvLimits, Dataset, Prepared, SeriesInfo, cut_windows, parse_csv, read_series_header,
};
use recur_core::train::check_shape;
use recur_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::ids::DatasetId;
use crate::spec::JobSpec;
use crate::{Error, Result};

/// How an uploaded file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// One sequence per line, the last value the target.
    #[default]
    Rows,
    /// A header, then one time step per line.
    Series,
}

impl Layout {
    /// The wire value.
    pub fn to_proto(self) -> pb::DatasetLayout {
        match self {
            Self::Rows => pb::DatasetLayout::Rows,
            Self::Series => pb::DatasetLayout::Series,
        }
    }

    /// From the wire; unknown values are refused.
    pub fn from_proto(value: i32) -> Result<Self> {
        match pb::DatasetLayout::try_from(value) {
            Ok(pb::DatasetLayout::Rows) => Ok(Self::Rows),
            Ok(pb::DatasetLayout::Series) => Ok(Self::Series),
            Err(_) => Err(Error::InvalidArgument(format!(
                "layout {value} is not a known dataset layout"
            ))),
        }
    }

    /// `rows` or `series`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rows => "rows",
            Self::Series => "series",
        }
    }
}

/// What an upload found in a file.
#[derive(Debug, Clone)]
pub enum Checked {
    /// Rows, parsed.
    Rows(Arc<Dataset>),
    /// A series' header and size.
    Series(SeriesInfo),
}

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

    /// Validates `bytes` as a file of `layout` and stores them under `id`.
    pub fn store(
        &self,
        id: &DatasetId,
        name: &str,
        bytes: &[u8],
        layout: Layout,
    ) -> Result<Checked> {
        let checked = match layout {
            Layout::Rows => {
                let data = Arc::new(
                    parse_csv(bytes, name, &self.limits).map_err(recur_core::Error::from)?,
                );
                self.cache_insert(id, &data);
                Checked::Rows(data)
            }
            Layout::Series => Checked::Series(
                read_series_header(bytes, name, &self.limits).map_err(recur_core::Error::from)?,
            ),
        };
        let path = self.path(id);
        if !path.exists() {
            atomic_write(&path, bytes)?;
        }
        Ok(checked)
    }

    fn read(&self, id: &DatasetId) -> Result<Vec<u8>> {
        let path = self.path(id);
        std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound(format!("dataset {id} not found; upload it first"))
            } else {
                Error::io(&path, e)
            }
        })
    }

    /// The parsed rows of a row file, from memory or disk.
    pub fn load(&self, id: &DatasetId) -> Result<Arc<Dataset>> {
        if let Some(d) = self.cache.lock().map_err(|_| poisoned())?.get(id) {
            return Ok(d.clone());
        }
        let bytes = self.read(id)?;
        let data = Arc::new(
            parse_csv(&bytes, &self.path(id).display().to_string(), &self.limits)
                .map_err(recur_core::Error::from)?,
        );
        self.cache_insert(id, &data);
        Ok(data)
    }

    /// A job's data: the rows shuffled and split by its seed, or the series (read again, its
    /// cells checked against the job's columns) cut into windows by time; normalised by its
    /// settings fitted on the training rows. `name` names the file in errors. Bad settings are
    /// `InvalidArgument`.
    pub fn prepare(&self, spec: &JobSpec, layout: Layout, name: &str) -> Result<Prepared> {
        let t = &spec.train;
        let prepared = match (layout, &spec.series) {
            (Layout::Rows, None) => {
                let data = self.load(&spec.dataset)?;
                Prepared::rows(&data, t.seed, t.split, t.scale, t.loss).map_err(Error::from)?
            }
            (Layout::Series, Some(series)) => {
                let bytes = self.read(&spec.dataset)?;
                let windows = cut_windows(&bytes, name, series, t.split, &self.limits)
                    .map_err(Error::from)?;
                Prepared::series(&windows, t.scale, t.loss).map_err(Error::from)?
            }
            (Layout::Rows, Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "series: dataset {} was uploaded as rows; a series spec needs a file uploaded \
                     as a series",
                    spec.dataset
                )));
            }
            (Layout::Series, None) => {
                return Err(Error::InvalidArgument(format!(
                    "dataset {} is a series: say which columns are features and targets and the \
                     window (JobSpec.series)",
                    spec.dataset
                )));
            }
        };
        check_shape(&t.model, &prepared.data).map_err(Error::from)?;
        if prepared.split.validation.is_empty() || prepared.split.test.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "dataset {}'s {} samples leave an empty validation or test split",
                spec.dataset,
                prepared.data.len()
            )));
        }
        Ok(prepared)
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

    /// Drops the parsed copy of a row file whose upload was refused after parsing (its bytes
    /// were recorded as a series meanwhile).
    pub fn forget_parsed(&self, id: &DatasetId) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(id);
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

//! The series layout: a CSV file with a header, one time step per line, cut into samples by a
//! job's settings: the feature and target columns, sliding windows of `window` steps every
//! `stride` steps, the target `horizon` steps after a window's last step.
//!
//! The series is split by time, not shuffled: the first `train` percent of its steps train, the
//! next `validation` percent validate, the rest test, and windows are cut inside each part, so no
//! value of a validation or test sample is ever seen in training (overlapping windows shuffled
//! across parts would leak them).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::csv::{CsvErrors, CsvLimits, LineError, LineProblem};
use super::{Dataset, Normalizer, Scale, Split, SplitFractions};
use crate::{Error, Result};

/// What to do with a time step whose used columns hold a missing value (an empty cell, `null`
/// or `NaN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// Refuse the file, naming every such cell (up to the error limit).
    #[default]
    Refuse,
    /// Leave the step out; windows run over the steps that remain.
    Drop,
}

/// A label derived from a target column instead of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// 1 when the column's value `horizon` steps after the window's last step is higher than at
    /// that last step, else 0 ("will it be higher in H days").
    Rises,
}

/// A fixed divisor for one column, instead of the job's normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnScale {
    /// The column's name in the header.
    pub column: String,
    /// Its values are divided by this.
    pub scale: f32,
}

/// How a series file becomes samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesSpec {
    /// Input columns, in the order of each step's features.
    pub features: Vec<String>,
    /// Target columns (may also be features).
    pub targets: Vec<String>,
    /// Steps per sample.
    pub window: usize,
    /// Steps between the starts of consecutive samples.
    pub stride: usize,
    /// The target is read this many steps after a window's last step (0: at its last step).
    pub horizon: usize,
    /// Missing values.
    pub missing: Missing,
    /// Sort the steps by this column first (numbers numerically, anything else as text, e.g.
    /// ISO dates); the file's order otherwise.
    pub order_by: Option<String>,
    /// Fixed divisors for some columns.
    pub column_scales: Vec<ColumnScale>,
    /// Derive 0/1 labels from the target columns instead of predicting their values.
    #[serde(default)]
    pub label: Option<Label>,
    /// A target at every step of a window (each step's value `horizon` steps later, or its
    /// label), not only after its last step.
    #[serde(default)]
    pub every_step: bool,
}

impl SeriesSpec {
    /// Most columns a job may name.
    pub const MAX_COLUMNS: usize = 1024;

    /// Checks the settings that do not need the file.
    pub fn validate(&self) -> Result<()> {
        if self.features.is_empty() {
            return Err(Error::setting("features", "name at least one column"));
        }
        if self.targets.is_empty() {
            return Err(Error::setting("targets", "name at least one column"));
        }
        if self.features.len() + self.targets.len() > Self::MAX_COLUMNS {
            return Err(Error::setting(
                "features",
                format!("at most {} columns in all", Self::MAX_COLUMNS),
            ));
        }
        for (field, names) in [("features", &self.features), ("targets", &self.targets)] {
            for (i, n) in names.iter().enumerate() {
                if n.trim().is_empty() {
                    return Err(Error::setting(field, "a column name is empty"));
                }
                if names[..i].contains(n) {
                    return Err(Error::setting(field, format!("`{n}` is named twice")));
                }
            }
        }
        if self.window == 0 {
            return Err(Error::setting("window", "must be at least 1 step"));
        }
        if self.stride == 0 {
            return Err(Error::setting("stride", "must be at least 1 step"));
        }
        if self.label == Some(Label::Rises) && self.horizon == 0 {
            return Err(Error::setting(
                "label",
                "`rises` compares a value with the one `horizon` steps later: horizon must be at least 1",
            ));
        }
        for c in &self.column_scales {
            if !(c.scale.is_finite() && c.scale > 0.0) {
                return Err(Error::setting(
                    "column_scales",
                    format!("`{}`: {} is not a positive number", c.column, c.scale),
                ));
            }
            if !self.features.contains(&c.column) && !self.targets.contains(&c.column) {
                return Err(Error::setting(
                    "column_scales",
                    format!("`{}` is neither a feature nor a target", c.column),
                ));
            }
        }
        Ok(())
    }
}

/// What an upload checks and reports of a series file.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInfo {
    /// The header's column names.
    pub columns: Vec<String>,
    /// Time steps (lines after the header, blank lines aside).
    pub steps: usize,
    /// The largest magnitude among the cells that are numbers.
    pub max_abs: f32,
}

/// A series cut into samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Windows {
    /// One row per window: `window` steps of the features, then the targets (raw values).
    pub data: Dataset,
    /// Its rows by time: training windows first, then validation, then test.
    pub split: Split,
    /// Steps the series had after dropping.
    pub steps: usize,
    /// Steps dropped for a missing value.
    pub dropped: usize,
    /// Fixed divisors per feature and per target, where the spec set one.
    fixed_inputs: Vec<Option<f32>>,
    fixed_targets: Vec<Option<f32>>,
}

impl Windows {
    /// The normalisation `scale` gives these samples (fitted on the training windows), with the
    /// spec's fixed divisors in place of the fitted maps of their columns.
    pub fn normalizer(&self, scale: Scale) -> Result<Normalizer> {
        let mut norm = Normalizer::fit(scale, &self.data, &self.split.train)?;
        for (a, fixed) in norm.inputs.iter_mut().zip(&self.fixed_inputs) {
            if let Some(s) = fixed {
                *a = super::Affine::divide(*s);
            }
        }
        for (a, fixed) in norm.targets.iter_mut().zip(&self.fixed_targets) {
            if let Some(s) = fixed {
                *a = super::Affine::divide(*s);
            }
        }
        Ok(norm)
    }
}

/// Collects line errors up to the limit.
struct Problems<'a> {
    name: &'a str,
    max: usize,
    errors: Vec<LineError>,
    more: usize,
}

impl<'a> Problems<'a> {
    fn new(name: &'a str, limits: &CsvLimits) -> Self {
        Self {
            name,
            max: limits.max_errors.max(1),
            errors: Vec::new(),
            more: 0,
        }
    }

    fn push(&mut self, line: usize, problem: LineProblem) {
        if self.errors.len() < self.max {
            self.errors.push(LineError { line, problem });
        } else {
            self.more += 1;
        }
    }

    fn fail(self) -> CsvErrors {
        CsvErrors {
            source_name: self.name.to_string(),
            errors: self.errors,
            more: self.more,
        }
    }

    fn one(name: &str, line: usize, problem: LineProblem) -> CsvErrors {
        CsvErrors {
            source_name: name.to_string(),
            errors: vec![LineError { line, problem }],
            more: 0,
        }
    }
}

fn reader(bytes: &[u8]) -> ::csv::Reader<&[u8]> {
    ::csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(::csv::Trim::All)
        .from_reader(bytes)
}

/// Reads the header; checks size, names and that every line has the header's fields.
fn header(
    rdr: &mut ::csv::Reader<&[u8]>,
    bytes: usize,
    name: &str,
    limits: &CsvLimits,
) -> Result<Vec<String>, CsvErrors> {
    if bytes > limits.max_bytes {
        return Err(Problems::one(
            name,
            0,
            LineProblem::FileTooLarge {
                bytes,
                limit: limits.max_bytes,
            },
        ));
    }
    let mut record = ::csv::StringRecord::new();
    let line = loop {
        match rdr.read_record(&mut record) {
            Ok(false) => return Err(Problems::one(name, 0, LineProblem::NoRows)),
            Ok(true) if record.iter().all(str::is_empty) => continue,
            Ok(true) => break record.position().map_or(1, |p| p.line() as usize),
            Err(e) => return Err(Problems::one(name, line_of(&e), unreadable(&e))),
        }
    };
    let columns: Vec<String> = record.iter().map(str::to_string).collect();
    let bad = |problem: String| Problems::one(name, line, LineProblem::BadHeader { problem });
    if columns.len() > limits.max_row_len {
        return Err(bad(format!(
            "{} columns, above the limit of {}",
            columns.len(),
            limits.max_row_len
        )));
    }
    if columns.iter().all(|c| c.parse::<f64>().is_ok()) {
        return Err(bad(
            "is all numbers: a series file starts with a header of column names".into(),
        ));
    }
    for (i, c) in columns.iter().enumerate() {
        if c.is_empty() {
            return Err(bad(format!("column {} has no name", i + 1)));
        }
        if columns[..i].contains(c) {
            return Err(bad(format!("`{c}` names two columns")));
        }
    }
    Ok(columns)
}

fn line_of(e: &::csv::Error) -> usize {
    e.position().map_or(0, |p| p.line() as usize)
}

fn unreadable(e: &::csv::Error) -> LineProblem {
    match e.kind() {
        ::csv::ErrorKind::Utf8 { .. } => LineProblem::NotUtf8,
        _ => LineProblem::Unreadable {
            problem: e.to_string(),
        },
    }
}

/// Whether a cell is a missing value: empty, `null` or `NaN` (any case).
fn is_missing(cell: &str) -> bool {
    cell.is_empty() || cell.eq_ignore_ascii_case("null") || cell.eq_ignore_ascii_case("nan")
}

/// Reads the lines after the header: skips blank ones; reports an unreadable line (reading on
/// past bad UTF-8 only), a line with another number of fields than the header, and the first
/// line past the row limit (and stops there); hands every other line's record to `each` with
/// its line number. Returns the lines counted (blank ones aside).
fn data_lines(
    rdr: &mut ::csv::Reader<&[u8]>,
    fields: usize,
    limits: &CsvLimits,
    problems: &mut Problems<'_>,
    mut each: impl FnMut(usize, &::csv::StringRecord, &mut Problems<'_>),
) -> usize {
    let mut record = ::csv::StringRecord::new();
    let mut lines = 0usize;
    loop {
        match rdr.read_record(&mut record) {
            Ok(false) => break,
            Err(e) => {
                problems.push(line_of(&e), unreadable(&e));
                if !matches!(e.kind(), ::csv::ErrorKind::Utf8 { .. }) {
                    break;
                }
            }
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line() as usize);
                if record.iter().all(str::is_empty) {
                    continue;
                }
                if lines >= limits.max_rows {
                    problems.push(
                        line,
                        LineProblem::TooManyRows {
                            limit: limits.max_rows,
                        },
                    );
                    break;
                }
                lines += 1;
                if record.len() != fields {
                    problems.push(
                        line,
                        LineProblem::FieldCount {
                            found: record.len(),
                            expected: fields,
                        },
                    );
                    continue;
                }
                each(line, &record, problems);
            }
        }
    }
    lines
}

/// Checks a series file at upload: a header of distinct names, the same number of fields on every
/// line, the size and row limits. Cells are checked when a job names their columns.
pub fn read_series_header(
    bytes: &[u8],
    name: &str,
    limits: &CsvLimits,
) -> Result<SeriesInfo, CsvErrors> {
    let mut rdr = reader(bytes);
    let columns = header(&mut rdr, bytes.len(), name, limits)?;
    let mut problems = Problems::new(name, limits);
    let mut max_abs = 0f32;
    let steps = data_lines(
        &mut rdr,
        columns.len(),
        limits,
        &mut problems,
        |_, record, _| {
            for cell in record {
                if let Ok(v) = cell.parse::<f32>()
                    && v.is_finite()
                {
                    max_abs = max_abs.max(v.abs());
                }
            }
        },
    );
    if problems.errors.is_empty() && steps == 0 {
        problems.push(0, LineProblem::NoRows);
    }
    if problems.errors.is_empty() {
        Ok(SeriesInfo {
            columns,
            steps,
            max_abs,
        })
    } else {
        Err(problems.fail())
    }
}

/// One kept time step: its line, its used values (features then targets) and its order key.
struct Step {
    line: usize,
    values: Vec<f32>,
    key: Option<String>,
}

/// Reads a series file with a job's settings and cuts it into windows, split by time.
pub fn cut_windows(
    bytes: &[u8],
    name: &str,
    spec: &SeriesSpec,
    fractions: SplitFractions,
    limits: &CsvLimits,
) -> Result<Windows> {
    spec.validate()?;
    let mut rdr = reader(bytes);
    let columns = header(&mut rdr, bytes.len(), name, limits)?;
    let index: HashMap<&str, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let find = |c: &String| {
        index.get(c.as_str()).copied().ok_or_else(|| {
            Problems::one(
                name,
                1,
                LineProblem::UnknownColumn {
                    name: c.clone(),
                    header: columns.join(","),
                },
            )
        })
    };
    let used: Vec<usize> = spec
        .features
        .iter()
        .chain(&spec.targets)
        .map(find)
        .collect::<Result<_, _>>()?;
    let order = spec.order_by.as_ref().map(find).transpose()?;
    let mut unique: Vec<usize> = Vec::new();
    let slots: Vec<usize> = used
        .iter()
        .map(|c| match unique.iter().position(|u| u == c) {
            Some(k) => k,
            None => {
                unique.push(*c);
                unique.len() - 1
            }
        })
        .collect();
    let mut problems = Problems::new(name, limits);
    let mut steps: Vec<Step> = Vec::new();
    let mut dropped = 0usize;
    data_lines(
        &mut rdr,
        columns.len(),
        limits,
        &mut problems,
        |line, record, problems| {
            // Each column once (a target may also be a feature).
            let mut cells = vec![f32::NAN; unique.len()];
            let mut missing = false;
            for (slot, &c) in unique.iter().enumerate() {
                let cell = &record[c];
                let column = || columns[c].clone();
                if is_missing(cell) {
                    missing = true;
                    if spec.missing == Missing::Refuse {
                        problems.push(
                            line,
                            LineProblem::MissingIn {
                                column: column(),
                                text: cell.to_string(),
                            },
                        );
                    }
                    continue;
                }
                match cell.parse::<f64>() {
                    Ok(v) if v.is_finite() && v.abs() <= limits.max_abs_value => {
                        cells[slot] = v as f32;
                    }
                    Ok(v) if v.is_finite() => problems.push(
                        line,
                        LineProblem::OutOfRangeIn {
                            column: column(),
                            value: v,
                            limit: limits.max_abs_value,
                        },
                    ),
                    _ => problems.push(
                        line,
                        LineProblem::NotANumberIn {
                            column: column(),
                            text: cell.chars().take(32).collect(),
                        },
                    ),
                }
            }
            // A step without its place in the order is missing too.
            if let Some(c) = order
                && is_missing(&record[c])
            {
                missing = true;
                if spec.missing == Missing::Refuse {
                    problems.push(
                        line,
                        LineProblem::MissingIn {
                            column: columns[c].clone(),
                            text: record[c].to_string(),
                        },
                    );
                }
            }
            let values: Vec<f32> = slots.iter().map(|&k| cells[k]).collect();
            if missing {
                dropped += 1;
            } else if values.iter().all(|v| !v.is_nan()) {
                steps.push(Step {
                    line,
                    values,
                    key: order.map(|c| record[c].to_string()),
                });
            }
        },
    );
    if !problems.errors.is_empty() {
        return Err(problems.fail().into());
    }
    if order.is_some() {
        sort_steps(&mut steps, name)?;
    }
    cut(steps, dropped, spec, fractions, limits)
}

/// Sorts by the order key: numerically when every key is a number, as text when none is (ISO
/// dates sort as text); stable, so equal keys keep the file's order. A column that mixes numbers
/// and text is refused: either order would be a guess.
fn sort_steps(steps: &mut [Step], name: &str) -> Result<()> {
    let number = |s: &Step| s.key.as_deref().and_then(|k| k.parse::<f64>().ok());
    let numbers = steps.iter().filter(|s| number(s).is_some()).count();
    if numbers == steps.len() {
        steps.sort_by(|a, b| {
            let (a, b) = (number(a).unwrap_or(0.0), number(b).unwrap_or(0.0));
            a.total_cmp(&b)
        });
    } else if numbers == 0 {
        steps.sort_by(|a, b| a.key.cmp(&b.key));
    } else {
        let (first_number, first_text) = (
            steps.iter().find(|s| number(s).is_some()),
            steps.iter().find(|s| number(s).is_none()),
        );
        let at = |s: Option<&Step>| {
            s.map_or_else(String::new, |s| {
                format!("line {} `{}`", s.line, s.key.as_deref().unwrap_or(""))
            })
        };
        return Err(Error::setting(
            "order_by",
            format!(
                "{name}: the order column mixes numbers ({}) and text ({})",
                at(first_number),
                at(first_text)
            ),
        ));
    }
    Ok(())
}

fn cut(
    steps: Vec<Step>,
    dropped: usize,
    spec: &SeriesSpec,
    fractions: SplitFractions,
    limits: &CsvLimits,
) -> Result<Windows> {
    let n = steps.len();
    let (w, h) = (spec.window, spec.horizon);
    let (features, targets) = (spec.features.len(), spec.targets.len());
    // A sample is held to what a row of the rows layout may hold, and all of them to what a
    // file of the largest size could hold, before anything is allocated.
    let targets_per_sample = if spec.every_step {
        w.saturating_mul(targets)
    } else {
        targets
    };
    let per_sample = w
        .saturating_mul(features)
        .saturating_add(targets_per_sample);
    if per_sample > limits.max_row_len {
        return Err(Error::setting(
            "window",
            format!(
                "{w} steps of {features} features make samples of {per_sample} values, above the \
                 limit of {} per sample",
                limits.max_row_len
            ),
        ));
    }
    if w > n {
        return Err(Error::setting(
            "window",
            format!("{w} steps is longer than the series' {n} steps"),
        ));
    }
    if w + h > n {
        return Err(Error::setting(
            "horizon",
            format!("{h} steps after a window of {w} leaves no samples in a series of {n} steps"),
        ));
    }
    let n_train = n * fractions.train as usize / 100;
    let n_val = n * fractions.validation as usize / 100;
    let parts = [
        ("training", 0, n_train),
        ("validation", n_train, n_train + n_val),
        ("test", n_train + n_val, n),
    ];
    let samples: usize = parts
        .iter()
        .map(|&(_, start, end)| {
            (end - start)
                .checked_sub(w + h)
                .map_or(0, |room| room / spec.stride + 1)
        })
        .sum();
    let budget = limits.max_bytes / 4;
    if samples.saturating_mul(per_sample) > budget {
        return Err(Error::setting(
            "stride",
            format!(
                "{samples} windows of {per_sample} values are above the limit of {budget} values \
                 in all (a larger stride or a shorter window cuts fewer)"
            ),
        ));
    }
    let mut data = if spec.every_step {
        Dataset::every_step(features, w, targets)
    } else {
        Dataset::with_shape(features, targets)
    };
    let mut split = Split {
        train: Vec::new(),
        validation: Vec::new(),
        test: Vec::new(),
    };
    let mut row = Vec::with_capacity(per_sample);
    for (part, (label, start, end)) in parts.into_iter().enumerate() {
        if end - start < w + h {
            return Err(Error::setting(
                "window",
                format!(
                    "the {label} part (steps {}..{}, lines {}) has {} steps, fewer than window {w} + horizon {h}: \
                     use a shorter window or a larger share",
                    start + 1,
                    end,
                    line_range(&steps[start.min(n)..end.min(n)]),
                    end - start
                ),
            ));
        }
        let mut s = start;
        while s + w + h <= end {
            row.clear();
            for step in &steps[s..s + w] {
                row.extend_from_slice(&step.values[..features]);
            }
            // The target of step `at` of the window: the target columns `h` steps after it.
            let first = if spec.every_step { 0 } else { w - 1 };
            for at in s + first..s + w {
                let target = &steps[at + h].values[features..];
                match spec.label {
                    None => row.extend_from_slice(target),
                    Some(Label::Rises) => {
                        let now = &steps[at].values[features..];
                        row.extend(
                            target
                                .iter()
                                .zip(now)
                                .map(|(t, n)| f32::from(u8::from(t > n))),
                        );
                    }
                }
            }
            let id = data.len();
            data.push_row(&row);
            [&mut split.train, &mut split.validation, &mut split.test][part].push(id);
            s += spec.stride;
        }
    }
    let fixed = |names: &[String]| -> Vec<Option<f32>> {
        names
            .iter()
            .map(|n| {
                spec.column_scales
                    .iter()
                    .find(|c| &c.column == n)
                    .map(|c| c.scale)
            })
            .collect()
    };
    Ok(Windows {
        data,
        split,
        steps: n,
        dropped,
        fixed_inputs: fixed(&spec.features),
        fixed_targets: fixed(&spec.targets),
    })
}

fn line_range(steps: &[Step]) -> String {
    match (steps.first(), steps.last()) {
        (Some(a), Some(b)) => format!("{}..{}", a.line, b.line),
        _ => "none".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "Date,Open,Close,Volume\n\
        2020-01-03,1,10,100\n\
        2020-01-01,2,20,200\n\
        2020-01-02,3,null,300\n\
        2020-01-04,4,40,400\n\
        \n\
        2020-01-05,5,50,500\n\
        2020-01-06,6,60,600\n\
        2020-01-07,7,70,700\n\
        2020-01-08,8,80,800\n\
        2020-01-09,9,90,900\n\
        2020-01-10,10,100,1000\n";

    fn spec() -> SeriesSpec {
        SeriesSpec {
            features: vec!["Close".into(), "Volume".into()],
            targets: vec!["Close".into()],
            window: 2,
            stride: 1,
            horizon: 1,
            missing: Missing::Drop,
            order_by: None,
            column_scales: Vec::new(),
            label: None,
            every_step: false,
        }
    }

    fn thirds() -> SplitFractions {
        SplitFractions {
            train: 34,
            validation: 34,
        }
    }

    fn limits() -> CsvLimits {
        CsvLimits::default()
    }

    fn cut_text(text: &str, spec: &SeriesSpec) -> Result<Windows> {
        cut_windows(text.as_bytes(), "s.csv", spec, thirds(), &limits())
    }

    #[test]
    fn the_header_is_read_and_every_line_counted() {
        let info = read_series_header(FILE.as_bytes(), "s.csv", &limits()).unwrap();
        assert_eq!(info.columns, ["Date", "Open", "Close", "Volume"]);
        assert_eq!(info.steps, 10);
        assert_eq!(info.max_abs, 1000.0);
        let e = read_series_header(b"1,2,3\n4,5,6\n", "n.csv", &limits()).unwrap_err();
        assert!(
            e.to_string().starts_with("n.csv:1: header: is all numbers"),
            "{e}"
        );
        let e = read_series_header(b"a,b\n1,2\n3\n4,5,6\n", "f.csv", &limits()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.csv:3: has 1 fields, the header has 2\nf.csv:4: has 3 fields, the header has 2"
        );
        let e = read_series_header(b"a,a\n1,2\n", "d.csv", &limits()).unwrap_err();
        assert_eq!(e.to_string(), "d.csv:1: header: `a` names two columns");
        let e = read_series_header(b"a,b\n", "e.csv", &limits()).unwrap_err();
        assert_eq!(e.to_string(), "e.csv: the file has no rows");
        let e = read_series_header(b"a,b\n\"1,2\n", "q.csv", &limits()).unwrap_err();
        assert!(e.to_string().starts_with("q.csv:"), "{e}");
    }

    #[test]
    fn windows_are_cut_inside_each_part_in_time_order() {
        let mut s = spec();
        s.order_by = Some("Date".into());
        let w = cut_text(FILE, &s).unwrap();
        // Sorted by date, the null step (01-02) dropped: closes 20,10,40,...,100 over 9 steps.
        assert_eq!((w.steps, w.dropped), (9, 1));
        // Parts of 3 steps each (9 * 34 / 100 = 3); window 2 + horizon 1 fits once in each.
        assert_eq!(w.split.train, [0]);
        assert_eq!(w.split.validation, [1]);
        assert_eq!(w.split.test, [2]);
        assert_eq!(w.data.features(), 2);
        assert_eq!(w.data.input(0), &[20.0, 200.0, 10.0, 100.0]);
        assert_eq!(w.data.targets(0), &[40.0]);
        assert_eq!(w.data.input(1), &[50.0, 500.0, 60.0, 600.0]);
        assert_eq!(w.data.targets(1), &[70.0]);
        assert_eq!(w.data.input(2), &[80.0, 800.0, 90.0, 900.0]);
        assert_eq!(w.data.targets(2), &[100.0]);

        // Without an order the file's order is kept; horizon 0 reads the window's last step.
        let mut s = spec();
        s.horizon = 0;
        s.window = 1;
        s.features = vec!["Open".into()];
        s.targets = vec!["Close".into(), "Volume".into()];
        let w = cut_text(FILE, &s).unwrap();
        assert_eq!(w.data.input(0), &[1.0]);
        assert_eq!(w.data.targets(0), &[10.0, 100.0]);
        assert_eq!(w.split.train, [0, 1, 2]);
        // Numbers sort as numbers (10 after 9), not as text.
        let mut s = spec();
        s.order_by = Some("Open".into());
        s.window = 1;
        s.horizon = 0;
        s.features = vec!["Open".into()];
        let w = cut_text(FILE, &s).unwrap();
        let opens: Vec<f32> = (0..w.data.len()).map(|i| w.data.input(i)[0]).collect();
        assert_eq!(opens, [1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
    }

    #[test]
    fn rises_labels_compare_the_horizon_with_the_window_end() {
        let mut s = spec();
        s.window = 1;
        s.horizon = 1;
        s.label = Some(Label::Rises);
        let w = cut_text("t,v\n0,5\n1,7\n2,7\n3,6\n4,9\n5,9\n6,1\n7,2\n8,3\n", &{
            s.features = vec!["v".into()];
            s.targets = vec!["v".into()];
            s
        })
        .unwrap();
        // Windows (one per part of 3 steps, two each): 5->7 rises, 7->7 does not; 6->9, 9->9;
        // 1->2, 2->3.
        let labels: Vec<f32> = (0..w.data.len()).map(|i| w.data.targets(i)[0]).collect();
        assert_eq!(labels, [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
        let mut s = spec();
        s.horizon = 0;
        s.label = Some(Label::Rises);
        assert!(message(cut_text(FILE, &s)).contains("horizon must be at least 1"));
    }

    #[test]
    fn every_step_targets_follow_each_step_of_the_window() {
        let file = "t,v\n0,5\n1,7\n2,7\n3,6\n4,9\n5,9\n6,1\n7,2\n8,3\n";
        let mut s = spec();
        s.features = vec!["v".into()];
        s.targets = vec!["v".into()];
        s.window = 2;
        s.horizon = 1;
        s.every_step = true;
        let w = cut_text(file, &s).unwrap();
        assert!(w.data.is_every_step());
        assert_eq!((w.data.targets_per_row(), w.data.outputs()), (2, 1));
        // One window per part of 3 steps: inputs of 2 steps, each step's value one step later.
        let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..w.data.len())
            .map(|i| (w.data.input(i).to_vec(), w.data.targets(i).to_vec()))
            .collect();
        assert_eq!(
            rows,
            [
                (vec![5.0, 7.0], vec![7.0, 7.0]),
                (vec![6.0, 9.0], vec![9.0, 9.0]),
                (vec![1.0, 2.0], vec![2.0, 3.0]),
            ]
        );
        s.label = Some(Label::Rises);
        let w = cut_text(file, &s).unwrap();
        let labels: Vec<f32> = (0..w.data.len())
            .flat_map(|i| w.data.targets(i).to_vec())
            .collect();
        assert_eq!(labels, [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
        // Two target columns: each step's pair, step by step; the limit counts them all.
        s.label = None;
        s.targets = vec!["v".into(), "t".into()];
        let w = cut_text(file, &s).unwrap();
        assert_eq!(w.data.targets(0), [7.0, 1.0, 7.0, 2.0]);
        assert_eq!(w.data.outputs(), 2);
        assert!(!w.data.fits(5) && w.data.fits(6));
    }

    #[test]
    fn stride_skips_starts() {
        let firsts = |stride| {
            let mut s = spec();
            s.window = 1;
            s.horizon = 0;
            s.stride = stride;
            let w = cut_text(FILE, &s).unwrap();
            (0..w.data.len())
                .map(|i| w.data.input(i)[0])
                .collect::<Vec<f32>>()
        };
        // Parts (9 steps after the drop): 10 20 40 | 50 60 70 | 80 90 100; starts every
        // `stride` steps inside each part.
        assert_eq!(firsts(1).len(), 9);
        assert_eq!(firsts(2), [10.0, 40.0, 50.0, 70.0, 80.0, 100.0]);
        assert_eq!(firsts(3), [10.0, 50.0, 80.0]);
    }

    #[test]
    fn orders_that_mix_numbers_and_text_and_oversized_windows_are_refused() {
        let mut s = spec();
        s.order_by = Some("k".into());
        s.features = vec!["v".into()];
        s.targets = vec!["v".into()];
        s.window = 1;
        let text = "k,v\n3,1\n1,2\nx,3\n2,4\n5,5\n6,6\n7,7\n8,8\n9,9\n";
        let m = message(cut_text(text, &s));
        assert!(
            m.contains("the order column mixes numbers (line 2 `3`) and text (line 4 `x`)"),
            "{m}"
        );
        // A missing order key is a missing value.
        s.missing = Missing::Refuse;
        let m = message(cut_text(&text.replace("x,3", ",3"), &s));
        assert!(m.contains("s.csv:4: column k: missing value ``"), "{m}");
        s.missing = Missing::Drop;
        assert_eq!(
            cut_text(&text.replace("x,3", "null,3"), &s)
                .unwrap()
                .dropped,
            1
        );

        let tight = CsvLimits {
            max_row_len: 5,
            ..CsvLimits::default()
        };
        let mut s = spec();
        s.window = 3;
        let m = message(cut_windows(FILE.as_bytes(), "s.csv", &s, thirds(), &tight));
        assert!(
            m.contains("3 steps of 2 features make samples of 7 values, above the limit of 5"),
            "{m}"
        );
        let small = CsvLimits {
            max_bytes: 40,
            ..CsvLimits::default()
        };
        let mut s = spec();
        s.window = 1;
        s.horizon = 0;
        let long = "a,b\n".to_string() + &"1,2\n".repeat(8);
        s.features = vec!["a".into()];
        s.targets = vec!["b".into()];
        let m = message(cut_windows(long.as_bytes(), "s.csv", &s, thirds(), &small));
        assert!(m.contains("above the limit of 10 values in all"), "{m}");
    }

    fn message(r: Result<Windows>) -> String {
        r.expect_err("should be refused").to_string()
    }

    #[test]
    fn bad_settings_and_cells_are_named() {
        let mut s = spec();
        s.features = vec!["close".into()];
        assert_eq!(
            message(cut_text(FILE, &s)),
            "s.csv:1: no column `close` in the header (Date,Open,Close,Volume)"
        );
        let mut s = spec();
        s.features = vec!["Date".into()];
        let m = message(cut_text(FILE, &s));
        assert!(
            m.starts_with("s.csv:2: column Date: `2020-01-03` is not a number\ns.csv:3:"),
            "{m}"
        );
        let mut s = spec();
        s.missing = Missing::Refuse;
        assert_eq!(
            message(cut_text(FILE, &s)),
            "s.csv:4: column Close: missing value `null` (drop such steps with the missing policy `drop`)"
        );
        let mut s = spec();
        s.window = 10;
        assert!(
            message(cut_text(FILE, &s)).contains("10 steps is longer than the series' 9 steps")
        );
        let mut s = spec();
        s.window = 5;
        s.horizon = 5;
        assert!(message(cut_text(FILE, &s)).contains("leaves no samples"));
        let mut s = spec();
        s.window = 3;
        let m = message(cut_text(FILE, &s));
        assert!(
            m.contains("the training part (steps 1..3, lines 2..5) has 3 steps, fewer than window 3 + horizon 1"),
            "{m}"
        );
        let mut s = spec();
        s.column_scales = vec![ColumnScale {
            column: "Open".into(),
            scale: 2.0,
        }];
        assert!(message(cut_text(FILE, &s)).contains("neither a feature nor a target"));
        let mut s = spec();
        s.targets.clear();
        assert!(message(cut_text(FILE, &s)).contains("targets"));
        let m = message(cut_text(
            "a,b
1,2
1e9,3
",
            &{
                let mut s = spec();
                s.features = vec!["a".into()];
                s.targets = vec!["b".into()];
                s
            },
        ));
        assert!(m.contains("s.csv:3: column a: 1000000000 is beyond"), "{m}");
    }

    #[test]
    fn fixed_column_scales_replace_the_fitted_maps() {
        let mut s = spec();
        s.column_scales = vec![ColumnScale {
            column: "Volume".into(),
            scale: 1e2,
        }];
        let w = cut_text(FILE, &s).unwrap();
        let norm = w.normalizer(Scale::Standard).unwrap();
        assert_eq!(norm.inputs[1], super::super::Affine::divide(100.0));
        // Close is standardised on the training window only (20 and 10).
        assert_eq!(norm.inputs[0].shift, 15.0);
        assert_eq!(norm.inputs[0].scale, 5.0);
    }
}

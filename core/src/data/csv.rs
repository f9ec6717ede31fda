//! Reading variable-length rows from CSV, with every problem reported by line.

use std::fmt;

use super::Dataset;

/// Limits a CSV file must stay within.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CsvLimits {
    /// Largest file, in bytes.
    pub max_bytes: usize,
    /// Most rows (blank lines are not rows).
    pub max_rows: usize,
    /// Most values in one row, target included.
    pub max_row_len: usize,
    /// Largest absolute value accepted.
    pub max_abs_value: f64,
    /// Line errors collected before the reader stops listing them.
    pub max_errors: usize,
}

impl Default for CsvLimits {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
            max_rows: 5_000_000,
            max_row_len: 4096,
            max_abs_value: 1e6,
            max_errors: 20,
        }
    }
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq)]
pub enum LineProblem {
    /// The line's bytes are not UTF-8.
    NotUtf8,
    /// The line has commas but no values.
    OnlyCommas,
    /// A field between commas is empty.
    EmptyValue {
        /// One-based position in the row.
        index: usize,
    },
    /// A field is not a number.
    NotANumber {
        /// One-based position in the row.
        index: usize,
        /// The field, cut to 32 characters.
        text: String,
    },
    /// A field is NaN or infinite.
    NotFinite {
        /// One-based position in the row.
        index: usize,
        /// The field as written.
        text: String,
    },
    /// A value's magnitude is above the limit.
    OutOfRange {
        /// One-based position in the row.
        index: usize,
        /// The value.
        value: f64,
        /// The limit.
        limit: f64,
    },
    /// Fewer than two values: there must be at least one input and the target.
    TooShort {
        /// Values found.
        len: usize,
    },
    /// More values than the limit.
    TooLong {
        /// Values found.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The file has more rows than the limit; reading stopped here.
    TooManyRows {
        /// The limit.
        limit: usize,
    },
    /// The file is larger than the limit; nothing was read.
    FileTooLarge {
        /// The file's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The file has no rows at all.
    NoRows,
    /// A series file's header is unusable.
    BadHeader {
        /// What is wrong with it.
        problem: String,
    },
    /// A series line has another number of fields than the header.
    FieldCount {
        /// Fields on the line.
        found: usize,
        /// Columns in the header.
        expected: usize,
    },
    /// A column a job names is not in the header.
    UnknownColumn {
        /// The name asked for.
        name: String,
        /// The header, as read.
        header: String,
    },
    /// A cell of a column used as a number is not one.
    NotANumberIn {
        /// The column's name.
        column: String,
        /// The cell, cut to 32 characters.
        text: String,
    },
    /// A cell of a used column is missing (empty, `null`, `NaN`) and missing values are refused.
    MissingIn {
        /// The column's name.
        column: String,
        /// The cell as written.
        text: String,
    },
    /// A cell's magnitude is above the limit.
    OutOfRangeIn {
        /// The column's name.
        column: String,
        /// The value.
        value: f64,
        /// The limit.
        limit: f64,
    },
    /// The CSV reader could not read on (an unterminated quote, say).
    Unreadable {
        /// The reader's message.
        problem: String,
    },
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 => write!(f, "not valid UTF-8"),
            Self::OnlyCommas => write!(f, "a line of only commas"),
            Self::EmptyValue { index } => write!(f, "value {index} is empty"),
            Self::NotANumber { index, text } => write!(f, "value {index} `{text}` is not a number"),
            Self::NotFinite { index, text } => {
                write!(f, "value {index} `{text}` is not finite")
            }
            Self::OutOfRange {
                index,
                value,
                limit,
            } => write!(f, "value {index} ({value}) is beyond ±{limit}"),
            Self::TooShort { len } => write!(
                f,
                "has {len} value, a row needs at least 2 (inputs, then the target)"
            ),
            Self::TooLong { len, limit } => {
                write!(f, "has {len} values, above the limit of {limit} per row")
            }
            Self::TooManyRows { limit } => write!(f, "more than {limit} rows, the limit"),
            Self::FileTooLarge { bytes, limit } => {
                write!(f, "the file has {bytes} bytes, above the limit of {limit}")
            }
            Self::NoRows => write!(f, "the file has no rows"),
            Self::BadHeader { problem } => write!(f, "header: {problem}"),
            Self::FieldCount { found, expected } => {
                write!(f, "has {found} fields, the header has {expected}")
            }
            Self::UnknownColumn { name, header } => {
                write!(f, "no column `{name}` in the header ({header})")
            }
            Self::NotANumberIn { column, text } => {
                write!(f, "column {column}: `{text}` is not a number")
            }
            Self::MissingIn { column, text } => write!(
                f,
                "column {column}: missing value `{text}` (drop such steps with the missing policy `drop`)"
            ),
            Self::OutOfRangeIn {
                column,
                value,
                limit,
            } => write!(f, "column {column}: {value} is beyond ±{limit}"),
            Self::Unreadable { problem } => write!(f, "unreadable: {problem}"),
        }
    }
}

/// One bad line.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// One-based line number; 0 for a problem with the whole file.
    pub line: usize,
    /// What is wrong.
    pub problem: LineProblem,
}

/// Every problem found in a file (up to [`CsvLimits::max_errors`]), in line order.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct CsvErrors {
    /// The file's name as the user gave it.
    pub source_name: String,
    /// The problems, in line order.
    pub errors: Vec<LineError>,
    /// Further bad lines that were not listed.
    pub more: usize,
}

impl CsvErrors {
    /// The first problem: the one to show when only one line fits.
    pub fn first(&self) -> Option<&LineError> {
        self.errors.first()
    }
}

impl fmt::Display for CsvErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.line == 0 {
                write!(f, "{}: {}", self.source_name, e.problem)?;
            } else {
                write!(f, "{}:{}: {}", self.source_name, e.line, e.problem)?;
            }
        }
        if self.more > 0 {
            write!(f, "\n{}: {} more bad lines", self.source_name, self.more)?;
        }
        Ok(())
    }
}

/// Parses a whole CSV file: one sequence per line, values separated by commas, no header, the
/// last value of a row is the target. Blank lines are skipped. `source_name` names the file in
/// errors.
pub fn parse_csv(
    bytes: &[u8],
    source_name: &str,
    limits: &CsvLimits,
) -> Result<Dataset, CsvErrors> {
    let mut errors = Vec::new();
    let mut more = 0;
    let fail = |errors: Vec<LineError>, more| CsvErrors {
        source_name: source_name.to_string(),
        errors,
        more,
    };
    if bytes.len() > limits.max_bytes {
        return Err(fail(
            vec![LineError {
                line: 0,
                problem: LineProblem::FileTooLarge {
                    bytes: bytes.len(),
                    limit: limits.max_bytes,
                },
            }],
            0,
        ));
    }
    let mut dataset = Dataset::default();
    let mut row = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let mut push = |problem| {
            if errors.len() < limits.max_errors.max(1) {
                errors.push(LineError { line, problem });
            } else {
                more += 1;
            }
        };
        let text = match std::str::from_utf8(raw) {
            Ok(text) => text.trim(),
            Err(_) => {
                push(LineProblem::NotUtf8);
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        if dataset.len() >= limits.max_rows {
            push(LineProblem::TooManyRows {
                limit: limits.max_rows,
            });
            break;
        }
        match parse_row(text, limits, &mut row) {
            Ok(()) => {
                if errors.is_empty() {
                    dataset.push_row(&row);
                }
            }
            Err(problem) => push(problem),
        }
    }
    if errors.is_empty() && dataset.is_empty() {
        errors.push(LineError {
            line: 0,
            problem: LineProblem::NoRows,
        });
    }
    if errors.is_empty() {
        Ok(dataset)
    } else {
        Err(fail(errors, more))
    }
}

fn parse_row(text: &str, limits: &CsvLimits, row: &mut Vec<f32>) -> Result<(), LineProblem> {
    row.clear();
    let fields = text.split(',');
    if text.chars().all(|c| c == ',' || c.is_whitespace()) {
        return Err(LineProblem::OnlyCommas);
    }
    let mut len = 0;
    for (i, field) in fields.enumerate() {
        len += 1;
        if len > limits.max_row_len {
            // Count the rest without parsing it.
            let len = len + text.split(',').skip(i + 1).count();
            return Err(LineProblem::TooLong {
                len,
                limit: limits.max_row_len,
            });
        }
        let index = i + 1;
        let field = field.trim();
        if field.is_empty() {
            return Err(LineProblem::EmptyValue { index });
        }
        let value: f64 = field.parse().map_err(|_| LineProblem::NotANumber {
            index,
            text: field.chars().take(32).collect(),
        })?;
        if !value.is_finite() {
            return Err(LineProblem::NotFinite {
                index,
                text: field.chars().take(32).collect(),
            });
        }
        if value.abs() > limits.max_abs_value {
            return Err(LineProblem::OutOfRange {
                index,
                value,
                limit: limits.max_abs_value,
            });
        }
        row.push(value as f32);
    }
    if len < 2 {
        return Err(LineProblem::TooShort { len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &[u8]) -> CsvErrors {
        parse_csv(text, "d.csv", &CsvLimits::default()).unwrap_err()
    }

    #[test]
    fn parses_variable_rows_and_skips_blank_lines() {
        let ds = parse_csv(
            b"1,2,3\r\n\n  4, 5 \n-1.5,2e1\n",
            "d.csv",
            &CsvLimits::default(),
        )
        .unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.row(1), [4.0, 5.0]);
        assert_eq!(ds.row(2), [-1.5, 20.0]);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let e = errors(b"1,2,3\n1,x,3\n5\n,,\n1,,2\n1,NaN\n2,inf\n\xff\xfe,1\n1,2e9\n");
        let shown = e.to_string();
        let expected = [
            "d.csv:2: value 2 `x` is not a number",
            "d.csv:3: has 1 value, a row needs at least 2",
            "d.csv:4: a line of only commas",
            "d.csv:5: value 2 is empty",
            "d.csv:6: value 2 `NaN` is not finite",
            "d.csv:7: value 2 `inf` is not finite",
            "d.csv:8: not valid UTF-8",
            "d.csv:9: value 2 (2000000000) is beyond ±1000000",
        ];
        for line in expected {
            assert!(shown.contains(line), "missing `{line}` in:\n{shown}");
        }
        assert_eq!(e.errors.len(), expected.len());
    }

    #[test]
    fn limits_are_enforced() {
        let limits = CsvLimits {
            max_bytes: 100,
            max_rows: 2,
            max_row_len: 3,
            max_errors: 2,
            ..CsvLimits::default()
        };
        let e = parse_csv(b"1,2,3,4\n", "d.csv", &limits).unwrap_err();
        assert_eq!(
            e.to_string(),
            "d.csv:1: has 4 values, above the limit of 3 per row"
        );
        let e = parse_csv(b"1,2\n1,2\n1,2\n", "d.csv", &limits).unwrap_err();
        assert_eq!(e.to_string(), "d.csv:3: more than 2 rows, the limit");
        let e = parse_csv(&[b'1'; 101], "d.csv", &limits).unwrap_err();
        assert!(e.to_string().contains("101 bytes, above the limit of 100"));
        let e = parse_csv(b"a,1\nb,1\nc,1\nd,1\n", "d.csv", &limits).unwrap_err();
        assert_eq!(e.errors.len(), 2);
        assert_eq!(e.more, 2);
        assert!(e.to_string().ends_with("d.csv: 2 more bad lines"));
        let e = parse_csv(b"\n\n", "d.csv", &limits).unwrap_err();
        assert_eq!(e.to_string(), "d.csv: the file has no rows");
    }
}

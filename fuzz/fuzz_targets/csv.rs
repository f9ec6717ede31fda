//! The CSV reader on arbitrary bytes: it parses or reports line-numbered errors, never panics,
//! and what it accepts writes back to the same rows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recur_core::data::{CsvLimits, parse_csv};

fuzz_target!(|data: &[u8]| {
    let limits = CsvLimits { max_bytes: 1 << 16, max_rows: 1000, max_row_len: 64, ..CsvLimits::default() };
    match parse_csv(data, "fuzz.csv", &limits) {
        Ok(ds) => {
            assert!(!ds.is_empty());
            let again = parse_csv(ds.to_csv().as_bytes(), "again.csv", &limits).expect("accepted rows write back");
            assert_eq!(again, ds);
        }
        Err(e) => {
            let lines = data.split(|&b| b == b'\n').count();
            assert!(!e.errors.is_empty());
            assert!(e.errors.iter().all(|l| l.line <= lines));
        }
    }
});

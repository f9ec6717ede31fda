//! Property tests of the CSV reader: valid files round-trip, and any mutation of a file either
//! parses or fails with line-numbered errors; it never panics.

use proptest::prelude::*;
use recur_core::data::{CsvLimits, Dataset, parse_csv};

fn dataset() -> impl Strategy<Value = Dataset> {
    proptest::collection::vec(proptest::collection::vec(-1e5f32..1e5, 2..20), 1..40).prop_map(
        |rows| {
            let mut ds = Dataset::default();
            for r in rows {
                ds.push_row(&r);
            }
            ds
        },
    )
}

proptest! {
    #[test]
    fn valid_files_round_trip(ds in dataset()) {
        let text = ds.to_csv();
        let back = parse_csv(text.as_bytes(), "p.csv", &CsvLimits::default()).unwrap();
        prop_assert_eq!(back, ds);
    }

    #[test]
    fn mutations_parse_or_name_a_line(
        ds in dataset(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = ds.to_csv().into_bytes();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            match byte % 3 {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => { bytes.remove(i); }
            }
            if bytes.is_empty() {
                break;
            }
        }
        let lines = bytes.split(|&b| b == b'\n').count();
        match parse_csv(&bytes, "p.csv", &CsvLimits::default()) {
            Ok(parsed) => prop_assert!(!parsed.is_empty()),
            Err(e) => {
                prop_assert!(!e.errors.is_empty());
                for err in &e.errors {
                    prop_assert!(err.line <= lines, "line {} of {}", err.line, lines);
                    let shown = e.to_string();
                    prop_assert!(shown.starts_with("p.csv"), "{}", shown);
                }
            }
        }
    }
}

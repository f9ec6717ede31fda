//! Normalisation, the train/validation/test split, shards and mini-batches.

use std::fmt;
use std::str::FromStr;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::{Error, Result};

/// How values are normalised: divided by a fixed number or by the training rows' largest magnitude
/// (every column alike), or standardised or min-max scaled per column with statistics of the
/// training rows only (see [`super::Normalizer::fit`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Divide by this (the tutorial's 50).
    Fixed(f32),
    /// Divide by the largest absolute value in the training rows.
    Auto,
    /// Subtract the training mean, divide by the training standard deviation, per column.
    Standard,
    /// Map the training minimum and maximum onto 0 and 1, per column.
    #[serde(rename = "minmax")]
    MinMax,
}

impl Default for Scale {
    fn default() -> Self {
        Self::Fixed(50.0)
    }
}

impl Scale {
    /// The one divisor of every column, for the uniform kinds (`fixed`, `auto`).
    pub fn resolve(self, ds: &Dataset) -> Result<f32> {
        let scale = match self {
            Self::Fixed(s) => s,
            Self::Auto => ds.stats().max_abs,
            Self::Standard | Self::MinMax => {
                return Err(Error::setting(
                    "scale",
                    format!("`{self}` is fitted per column, not one divisor"),
                ));
            }
        };
        if scale.is_finite() && scale > 0.0 {
            Ok(scale)
        } else {
            Err(Error::setting(
                "scale",
                format!("must be a positive finite number, got {scale}"),
            ))
        }
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(s) => write!(f, "{s}"),
            Self::Auto => f.write_str("auto"),
            Self::Standard => f.write_str("standard"),
            Self::MinMax => f.write_str("minmax"),
        }
    }
}

impl FromStr for Scale {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => return Ok(Self::Auto),
            "standard" => return Ok(Self::Standard),
            "minmax" => return Ok(Self::MinMax),
            _ => {}
        }
        match s.parse::<f32>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(Self::Fixed(v)),
            _ => Err(Error::setting(
                "scale",
                format!("`{s}` is none of `auto`, `standard`, `minmax` or a positive number"),
            )),
        }
    }
}

/// Shares of the rows for training, validation and test, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitFractions {
    /// Percent for training.
    pub train: u32,
    /// Percent for validation.
    pub validation: u32,
}

impl Default for SplitFractions {
    /// The tutorial's 60/20/20.
    fn default() -> Self {
        Self {
            train: 60,
            validation: 20,
        }
    }
}

/// Row indices of the three parts, from a seeded permutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Training rows.
    pub train: Vec<usize>,
    /// Validation rows.
    pub validation: Vec<usize>,
    /// Test rows.
    pub test: Vec<usize>,
}

impl Split {
    /// Shuffles `0..rows` with `seed` and cuts it: `rows * train / 100` rows for training (rounded
    /// down), `rows * validation / 100` for validation, the rest for test.
    pub fn new(rows: usize, seed: u64, fractions: SplitFractions) -> Result<Self> {
        if fractions.train == 0 || fractions.train + fractions.validation > 100 {
            return Err(Error::setting(
                "split",
                format!(
                    "train {}% and validation {}% must leave a training part and sum to at most 100",
                    fractions.train, fractions.validation
                ),
            ));
        }
        let mut perm: Vec<usize> = (0..rows).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let n_train = rows * fractions.train as usize / 100;
        let n_val = rows * fractions.validation as usize / 100;
        if n_train == 0 {
            return Err(Error::setting(
                "split",
                format!("{rows} rows leave no training rows"),
            ));
        }
        let test = perm.split_off(n_train + n_val);
        let validation = perm.split_off(n_train);
        Ok(Self {
            train: perm,
            validation,
            test,
        })
    }
}

/// A digest of a multiset of row indices: the wrapping sum of a 64-bit mix of each. Digests add
/// up (`rows_digest(a ++ b) == rows_digest(a).wrapping_add(rows_digest(b))`), so the digests of
/// an epoch's steps sum to the digest of the training split exactly when the steps used each of
/// its rows once (up to a 2^-64 chance), in whatever order and grouping.
pub fn rows_digest(rows: &[usize]) -> u64 {
    rows.iter().fold(0u64, |acc, &r| {
        // SplitMix64's finaliser: consecutive indices land far apart.
        let mut z = (r as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        acc.wrapping_add(z ^ (z >> 31))
    })
}

/// Weights usable for sharing out work: one per worker, each positive and finite; anything else
/// (an empty list, a zero, a NaN) makes every weight 1.
fn usable_weights(weights: &[f64]) -> Vec<f64> {
    if weights.iter().all(|w| w.is_finite() && *w > 0.0) {
        weights.to_vec()
    } else {
        vec![1.0; weights.len()]
    }
}

/// Divides `rows` into one shard per weight, each shard's total steps (`steps(row)`) in
/// proportion to its weight (a worker's speed): longest rows first, each to the shard that would
/// finish it soonest (`(total + steps) / weight` smallest; ties to the lower index). A shard's
/// normalised load `total / weight` exceeds any other's by at most the longest row divided by
/// that other's weight. Each shard keeps its rows in ascending index order. Equal weights give
/// shards whose totals differ by at most the longest row.
pub fn shard_by_steps(
    rows: &[usize],
    weights: &[f64],
    steps: impl Fn(usize) -> usize,
) -> Vec<Vec<usize>> {
    let weights = usable_weights(if weights.is_empty() { &[1.0] } else { weights });
    let n = weights.len();
    let mut by_len: Vec<usize> = rows.to_vec();
    by_len.sort_by_key(|&r| (std::cmp::Reverse(steps(r)), r));
    let mut shards = vec![Vec::new(); n];
    let mut totals = vec![0usize; n];
    for r in by_len {
        let s = steps(r);
        let finish = |k: usize| (totals[k] + s) as f64 / weights[k];
        let k = (1..n).fold(0, |best, k| if finish(k) < finish(best) { k } else { best });
        totals[k] += s;
        shards[k].push(r);
    }
    for shard in &mut shards {
        shard.sort_unstable();
    }
    shards
}

/// Cuts `rows` (one mini-batch, in its order) into one contiguous part per weight, each part's
/// steps in proportion to its weight: a row goes to the part whose share of the batch's steps its
/// midpoint falls in. When there are at least as many rows as weights every part gets at least
/// one row, so every worker keeps being measured; otherwise the first `rows.len()` parts get one.
/// The parts, concatenated, are `rows`.
pub fn split_batch(
    rows: &[usize],
    weights: &[f64],
    steps: impl Fn(usize) -> usize,
) -> Vec<Vec<usize>> {
    let weights = usable_weights(if weights.is_empty() { &[1.0] } else { weights });
    let n = weights.len();
    let total_weight: f64 = weights.iter().sum();
    let total_steps: f64 = rows.iter().map(|&r| steps(r) as f64).sum();
    // Part k takes the rows whose midpoint lies below bound[k].
    let mut bounds = Vec::with_capacity(n);
    let mut acc = 0.0;
    for w in &weights {
        acc += w;
        bounds.push(total_steps * acc / total_weight);
    }
    // cut[k] = index of the first row after part k.
    let mut cut = vec![0usize; n];
    let (mut k, mut at) = (0, 0.0);
    for (i, &r) in rows.iter().enumerate() {
        let s = steps(r) as f64;
        let mid = at + s / 2.0;
        while k + 1 < n && mid >= bounds[k] {
            cut[k] = i;
            k += 1;
        }
        at += s;
    }
    for c in cut.iter_mut().skip(k) {
        *c = rows.len();
    }
    // At least one row a part where there are enough rows: every cut past the one before it,
    // then every cut before the one after it (the last cut stays at the end).
    if rows.len() >= n {
        let mut previous = 0;
        for c in &mut cut {
            *c = (*c).max(previous + 1);
            previous = *c;
        }
        let mut next = rows.len() + 1;
        for c in cut.iter_mut().rev() {
            *c = (*c).min(next - 1);
            next = *c;
        }
    } else {
        for (k, c) in cut.iter_mut().enumerate() {
            *c = (k + 1).min(rows.len());
        }
    }
    let mut parts = Vec::with_capacity(n);
    let mut start = 0;
    for &c in &cut {
        parts.push(rows[start..c].to_vec());
        start = c;
    }
    parts
}

/// The mini-batches of one epoch: `rows` shuffled with a generator seeded by `(seed, epoch)`,
/// then cut into batches of `batch_size` (the last one may be smaller).
pub fn epoch_batches(rows: &[usize], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut order = rows.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// The batches of a stateful epoch: `rows` (consecutive chunks of one series, in time order)
/// cut into `streams` contiguous spans, the first `len % streams` one chunk longer; batch `j`
/// holds chunk `j` of every span that has one, span by span. So row `i` of every batch belongs
/// to span `i`, and the state a span's chunk ends with starts its next chunk in the next batch.
/// Never shuffled: the order is the state's path.
pub fn stream_batches(rows: &[usize], streams: usize) -> Vec<Vec<usize>> {
    let streams = streams.clamp(1, rows.len().max(1));
    let (base, extra) = (rows.len() / streams, rows.len() % streams);
    let mut spans = Vec::with_capacity(streams);
    let mut start = 0;
    for k in 0..streams {
        let len = base + usize::from(k < extra);
        spans.push(&rows[start..start + len]);
        start += len;
    }
    (0..spans.first().map_or(0, |s| s.len()))
        .map(|j| spans.iter().filter_map(|s| s.get(j).copied()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_batches_walk_each_span_in_order_with_its_row_index_fixed() {
        let rows: Vec<usize> = (10..21).collect(); // 11 chunks, 3 spans of 4, 4, 3
        let batches = stream_batches(&rows, 3);
        assert_eq!(
            batches,
            vec![
                vec![10, 14, 18],
                vec![11, 15, 19],
                vec![12, 16, 20],
                vec![13, 17],
            ]
        );
        // Every row once; one span is one batch of 1 at a time.
        assert_eq!(stream_batches(&rows, 1).len(), 11);
        assert!(stream_batches(&rows, 1).iter().all(|b| b.len() == 1));
        // More spans than chunks: one chunk each.
        assert_eq!(stream_batches(&rows[..2], 5), vec![vec![10, 11]]);
        assert!(stream_batches(&[], 3).is_empty());
    }

    #[test]
    fn rows_digest_adds_up_and_tells_multisets_apart() {
        let all: Vec<usize> = (0..500).collect();
        let (a, b) = all.split_at(137);
        assert_eq!(
            rows_digest(&all),
            rows_digest(a).wrapping_add(rows_digest(b))
        );
        let mut shuffled = all.clone();
        shuffled.reverse();
        assert_eq!(rows_digest(&shuffled), rows_digest(&all));
        // A row used twice and another never is a different multiset.
        let mut twice = all.clone();
        twice[3] = 4;
        assert_ne!(rows_digest(&twice), rows_digest(&all));
        assert_ne!(rows_digest(&all[1..]), rows_digest(&all));
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn split_is_seeded_and_complete() {
        let s = Split::new(10_000, 5, SplitFractions::default()).unwrap();
        assert_eq!(
            (s.train.len(), s.validation.len(), s.test.len()),
            (6000, 2000, 2000)
        );
        let mut all: Vec<_> = s
            .train
            .iter()
            .chain(&s.validation)
            .chain(&s.test)
            .copied()
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        assert_eq!(s, Split::new(10_000, 5, SplitFractions::default()).unwrap());
        assert_ne!(s, Split::new(10_000, 6, SplitFractions::default()).unwrap());
        assert!(Split::new(1, 5, SplitFractions::default()).is_err());
    }

    #[test]
    fn scale_parses_and_resolves() {
        let mut ds = Dataset::default();
        ds.push_row(&[1.0, -8.0]);
        assert_eq!("auto".parse::<Scale>().unwrap().resolve(&ds).unwrap(), 8.0);
        assert_eq!("50".parse::<Scale>().unwrap().resolve(&ds).unwrap(), 50.0);
        assert!("0".parse::<Scale>().is_err());
        assert!("NaN".parse::<Scale>().is_err());
    }

    #[test]
    fn batches_cover_every_row_once() {
        let rows: Vec<usize> = (0..250).collect();
        let b = epoch_batches(&rows, 100, 1, 0);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [100, 100, 50]);
        let mut seen: Vec<_> = b.concat();
        seen.sort_unstable();
        assert_eq!(seen, rows);
        assert_ne!(b, epoch_batches(&rows, 100, 1, 1));
        assert_eq!(b, epoch_batches(&rows, 100, 1, 0));
    }

    proptest! {
        #[test]
        fn shards_are_balanced_by_steps(
            lens in proptest::collection::vec(1usize..200, 0..300),
            n in 1usize..9,
        ) {
            let rows: Vec<usize> = (0..lens.len()).collect();
            let shards = shard_by_steps(&rows, &vec![1.0; n], |r| lens[r]);
            prop_assert_eq!(shards.len(), n);
            let mut all: Vec<usize> = shards.concat();
            all.sort_unstable();
            prop_assert_eq!(all, rows);
            let totals: Vec<usize> = shards.iter().map(|s| s.iter().map(|&r| lens[r]).sum()).collect();
            let longest = lens.iter().copied().max().unwrap_or(0);
            let spread = totals.iter().max().unwrap() - totals.iter().min().unwrap();
            prop_assert!(spread <= longest, "totals {:?}, longest {}", totals, longest);
        }

        #[test]
        fn weighted_shards_follow_the_weights(
            lens in proptest::collection::vec(1usize..200, 0..300),
            weights in proptest::collection::vec(0.1f64..10.0, 1..6),
        ) {
            let rows: Vec<usize> = (0..lens.len()).collect();
            let shards = shard_by_steps(&rows, &weights, |r| lens[r]);
            prop_assert_eq!(shards.len(), weights.len());
            let mut all: Vec<usize> = shards.concat();
            all.sort_unstable();
            prop_assert_eq!(all, rows);
            let longest = lens.iter().copied().max().unwrap_or(0) as f64;
            let load: Vec<f64> = shards
                .iter()
                .zip(&weights)
                .map(|(s, w)| s.iter().map(|&r| lens[r]).sum::<usize>() as f64 / w)
                .collect();
            for (i, li) in load.iter().enumerate() {
                for (j, lj) in load.iter().enumerate() {
                    prop_assert!(
                        *li <= lj + longest / weights[j] + 1e-9,
                        "shard {} load {} against shard {} load {} (longest {})", i, li, j, lj, longest
                    );
                }
            }
        }

        #[test]
        fn batch_parts_follow_the_weights(
            lens in proptest::collection::vec(1usize..50, 0..300),
            weights in proptest::collection::vec(0.01f64..10.0, 1..6),
        ) {
            let rows: Vec<usize> = (0..lens.len()).rev().collect();
            let parts = split_batch(&rows, &weights, |r| lens[r]);
            prop_assert_eq!(parts.len(), weights.len());
            prop_assert_eq!(parts.concat(), rows.clone());
            if rows.len() >= weights.len() {
                prop_assert!(parts.iter().all(|p| !p.is_empty()), "an empty part: {:?}", parts);
            }
            let total: f64 = lens.iter().map(|&l| l as f64).sum();
            let sum_w: f64 = weights.iter().sum();
            let longest = lens.iter().copied().max().unwrap_or(0) as f64;
            // The one-row floor can move at most one row per part on each side.
            let slack = longest * (weights.len() as f64 + 1.0);
            for (p, w) in parts.iter().zip(&weights) {
                let got: f64 = p.iter().map(|&r| lens[r] as f64).sum();
                let want = total * w / sum_w;
                prop_assert!((got - want).abs() <= slack, "part has {} steps, share {}, slack {}", got, want, slack);
            }
        }
    }
}

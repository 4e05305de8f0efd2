//! Medians, percentiles and min/max summaries of repeated measurements (pure maths).

use serde::Serialize;

/// A figure measured several times: its median, minimum and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Median (mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// How many values (NaNs are dropped).
    pub n: usize,
}

impl Summary {
    /// The summary of `values` (NaNs ignored); `None` when nothing is left.
    pub fn of(values: &[f64]) -> Option<Self> {
        let sorted = sorted(values);
        Some(Self {
            median: percentile_sorted(&sorted, 50.0)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
            n: sorted.len(),
        })
    }

    /// The same summary with every value multiplied by `factor` (e.g. seconds to ms).
    pub fn scaled(self, factor: f64) -> Self {
        let (a, b) = (self.min * factor, self.max * factor);
        Self {
            median: self.median * factor,
            min: a.min(b),
            max: a.max(b),
            n: self.n,
        }
    }
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The `p`-th percentile (0–100) with linear interpolation between closest ranks (numpy's
/// default): p50 of [1, 2, 3, 4] is 2.5, p95 of 1..=20 is 19.05. `None` for no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    percentile_sorted(&sorted(values), p)
}

fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (p.clamp(0.0, 100.0) / 100.0) * last as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let (a, b) = (*sorted.get(lo)?, *sorted.get(hi.min(last))?);
    Some(a + (b - a) * (rank - lo as f64))
}

/// The median of `values` (see [`percentile`]).
pub fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 50.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(20.0));
        let p95 = percentile(&v, 95.0).unwrap_or(f64::NAN);
        assert!((p95 - 19.05).abs() < 1e-9, "{p95}");
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.5));
        // Out-of-range percentiles clamp.
        assert_eq!(percentile(&[1.0, 2.0], 150.0), Some(2.0));
    }

    #[test]
    fn summaries_keep_min_median_max() -> Result<(), String> {
        let s = Summary::of(&[0.3, 0.1, 0.2]).ok_or("empty")?;
        assert_eq!((s.min, s.median, s.max, s.n), (0.1, 0.2, 0.3, 3));
        let ms = s.scaled(1000.0);
        assert!((ms.median - 200.0).abs() < 1e-9);
        let inverted = s.scaled(-1.0);
        assert!(inverted.min <= inverted.max);
        assert!(Summary::of(&[]).is_none());
        Ok(())
    }
}

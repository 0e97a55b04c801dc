//! Key distributions for generated records.

use anyhow::{bail, Context, Result};

/// How keys are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyDistribution {
    /// No key (sticky partitioning).
    None,
    /// One of `k` keys, uniformly.
    Uniform(u64),
    /// One of `k` keys, Zipf-distributed with exponent `s` (a few hot keys).
    Zipf(u64, f64),
}

impl std::str::FromStr for KeyDistribution {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["none"] => Ok(KeyDistribution::None),
            ["uniform", k] => {
                Ok(KeyDistribution::Uniform(k.parse::<u64>().context("uniform:K needs a number")?.max(1)))
            }
            ["zipf", k, s] => {
                let k: u64 = k.parse().context("zipf:K:S needs a number K")?;
                let s: f64 = s.parse().context("zipf:K:S needs a number S")?;
                if k == 0 || s <= 0.0 {
                    bail!("zipf:K:S needs K >= 1 and S > 0");
                }
                Ok(KeyDistribution::Zipf(k, s))
            }
            _ => bail!("key distribution is none, uniform:K or zipf:K:S, not '{s}'"),
        }
    }
}

/// Draws keys from a distribution with a seeded generator.
pub struct KeyGen {
    dist: KeyDistribution,
    state: u64,
    /// Cumulative weights for zipf, normalised to 1.
    cdf: Vec<f64>,
}

impl KeyGen {
    /// A generator for `dist` seeded with `seed`.
    pub fn new(dist: KeyDistribution, seed: u64) -> KeyGen {
        let cdf = match dist {
            KeyDistribution::Zipf(k, s) => {
                let weights: Vec<f64> = (1..=k.min(1 << 20)).map(|i| 1.0 / (i as f64).powf(s)).collect();
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                weights
                    .iter()
                    .map(|w| {
                        acc += w / total;
                        acc
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        KeyGen { dist, state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, cdf }
    }

    /// The next key index, or `None` for keyless records.
    pub fn next_key(&mut self) -> Option<u64> {
        match self.dist {
            KeyDistribution::None => None,
            KeyDistribution::Uniform(k) => Some(self.next_u64() % k),
            KeyDistribution::Zipf(..) => {
                let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                Some(self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64)
            }
        }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_parse_and_draw_in_range() {
        assert_eq!("none".parse::<KeyDistribution>().expect("none"), KeyDistribution::None);
        assert!("uniform".parse::<KeyDistribution>().is_err());
        assert!("zipf:10:0".parse::<KeyDistribution>().is_err());
        let mut u = KeyGen::new("uniform:7".parse().expect("uniform"), 1);
        assert!((0..1000).all(|_| u.next_key().is_some_and(|k| k < 7)));
        let mut z = KeyGen::new("zipf:100:1.2".parse().expect("zipf"), 1);
        let draws: Vec<u64> = (0..10_000).map(|_| z.next_key().expect("key")).collect();
        assert!(draws.iter().all(|&k| k < 100));
        let hot = draws.iter().filter(|&&k| k == 0).count();
        let cold = draws.iter().filter(|&&k| k == 99).count();
        assert!(hot > 10 * cold.max(1), "key 0 is hot: {hot} vs {cold}");
    }
}

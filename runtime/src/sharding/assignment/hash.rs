//! The fixed hash behind the assignment. It decides ownership across
//! versions of the binary, so it may never change: golden tests pin it.

use super::Runner;

/// A runner's hash and weight, ready for pair keys.
pub(super) struct PreparedRunner {
    /// splitmix64 of the FNV-1a hash of the id.
    pub(super) mixed_hash: u64,
    /// `2^32 / weight`, so a key is a multiplication, not a division.
    pub(super) inverse_weight: u64,
}

impl PreparedRunner {
    pub(super) fn new(runner: &Runner) -> Self {
        Self {
            mixed_hash: splitmix64(fnv1a(FNV_OFFSET, runner.id.as_str().as_bytes())),
            inverse_weight: (1u64 << 32) / u64::from(runner.weight),
        }
    }
}

pub(super) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64-bit, continuing from `hash`.
pub(super) fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The splitmix64 finaliser: spreads every input bit over the output.
pub(super) fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over `group`, `0xff`, and `index` as little-endian bytes.
pub(super) fn shard_hash(group: &str, index: u32) -> u64 {
    let hash = fnv1a(FNV_OFFSET, group.as_bytes());
    let hash = fnv1a(hash, &[0xff]);
    fnv1a(hash, &index.to_le_bytes())
}

/// The pair's key, smaller preferred: `-log2(u) / weight` in fixed point,
/// with `u` the pair hash read as a fraction of 2^64.
pub(super) fn pair_key(shard_hash: u64, runner: &PreparedRunner) -> u64 {
    let u = splitmix64(shard_hash ^ runner.mixed_hash);
    // ≤ 65 · 2^24 < 2^31, times ≤ 2^32: fits in u64.
    neg_log2_q24(u) * runner.inverse_weight
}

/// `-log2(u / 2^64)` in Q24 fixed point (24 fractional bits), approximated
/// with integers only so no platform can compute it differently.
///
/// With `x = 2^e · (1 + f)`, `-log2(x / 2^64) = 64 - e - log2(1 + f)`, and
/// `log2(1 + f) ≈ f + c·f·(1 - f)` with `c = 0.34375` (error under 0.01 over
/// `0 ≤ f < 1`; the key needs to be monotone and close, not exact).
pub(super) fn neg_log2_q24(u: u64) -> u64 {
    let x = u | 1;
    let zeros = u64::from(x.leading_zeros());
    // The bits after the leading one, as a Q24 fraction f in [0, 1).
    let f = ((x << zeros) << 1) >> 40;
    let one = 1u64 << 24;
    // c · f · (1 - f) with c = 11/32.
    let correction = (((f * (one - f)) >> 24) * 11) >> 5;
    let log2_mantissa = f + correction;
    ((zeros + 1) << 24) - log2_mantissa
}

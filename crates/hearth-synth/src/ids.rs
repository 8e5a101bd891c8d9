//! Deterministic, collision-free resource ids.
//!
//! Ids are a keyed bijection of a per-type ordinal, not RNG draws, for two
//! reasons: any resource's id can be computed from its ordinal without having
//! generated (or remembered) it — Groups list patients and encounters cite
//! pooled practitioners without keeping the population in memory — and two
//! distinct ordinals can never collide, so ids are unique per type by
//! construction rather than by probability.

use crate::json::{Id, uuid};

/// The SplitMix64 finalizer: a bijection on `u64` with good avalanche.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bits of a patient-scoped ordinal that count resources within one patient.
pub(crate) const LOCAL_BITS: u32 = 24;

#[derive(Clone, Copy)]
pub(crate) struct IdKey {
    hi: u64,
    lo: u64,
}

impl IdKey {
    pub(crate) fn new(seed: u64, domain: u64) -> Self {
        let base = mix64(seed ^ mix64(domain.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        Self {
            hi: mix64(base ^ 0x5851_f42d_4c95_7f2d),
            lo: mix64(base ^ 0x1405_7b7e_f767_814f),
        }
    }

    /// The id for `ordinal`; injective in `ordinal`.
    pub(crate) fn id(self, ordinal: u64) -> Id {
        let hi = mix64(ordinal ^ self.hi);
        let lo = mix64(ordinal.wrapping_add(self.lo));
        // Setting the UUID version nibble would destroy 4 bits of `hi`; they are
        // moved into `lo` instead so `hi` (hence the ordinal) stays recoverable.
        let displaced = (hi >> 12) & 0xf;
        let hi = (hi & !(0xf << 12)) | (0x4 << 12);
        let lo = (0b10 << 62) | (displaced << 58) | (lo & ((1 << 58) - 1));
        uuid(hi, lo)
    }
}

/// Ordinal of the `local`-th resource of a type within patient `patient`.
#[inline]
pub(crate) fn scoped(patient: u64, local: u64) -> u64 {
    (patient << LOCAL_BITS) | (local & ((1 << LOCAL_BITS) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_uuid_shaped_and_keyed() {
        let key = IdKey::new(7, 1);
        let mut seen = HashSet::new();
        for n in 0..100_000u64 {
            let id = key.id(n);
            assert_eq!(id[14], b'4');
            assert!(matches!(id[19], b'8' | b'9' | b'a' | b'b'));
            assert!(seen.insert(id));
        }
        assert_ne!(IdKey::new(7, 1).id(0), IdKey::new(8, 1).id(0));
        assert_ne!(IdKey::new(7, 1).id(0), IdKey::new(7, 2).id(0));
    }
}

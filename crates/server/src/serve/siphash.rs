//! SipHash with a 128-bit output (Aumasson & Bernstein, "SipHash: a fast short-input PRF",
//! 2012, and the 128-bit variant of the reference implementation `veorq/SipHash`), streaming.
//!
//! The replay store digests every Rank request with a keyed 128-bit PRF. The standard
//! library's SipHash-1-3 only gives 64 bits, so two of them (two keys) were computed over the
//! same bytes; the 128-bit variant gives both halves from one pass over the input, at half
//! the cost. `C` and `D` are the compression and finalization rounds: the replay store uses
//! SipHash-1-3 (the standard library's choice for hash tables); the tests check SipHash-2-4
//! against the reference vectors, and the 64-bit SipHash-1-3 against the standard library.

/// A streaming SipHash-`C`-`D` state; `write` calls concatenate.
#[derive(Debug, Clone)]
pub struct SipHasher<const C: usize, const D: usize> {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    /// Up to 7 input bytes not yet compressed, little-endian in the low bytes.
    tail: u64,
    /// Number of bytes in `tail`.
    tail_len: usize,
    /// Total input length (only its low byte enters the hash, as the algorithm defines).
    length: usize,
    /// Whether this is the 128-bit variant (different initialization and finalization).
    wide: bool,
}

/// SipHash-1-3 with a 128-bit output: the replay digest.
pub type SipHasher13 = SipHasher<1, 3>;

impl<const C: usize, const D: usize> SipHasher<C, D> {
    /// A 128-bit-output hasher keyed by `(k0, k1)` (the key's two little-endian halves).
    pub fn new_128(k0: u64, k1: u64) -> Self {
        Self::with_keys(k0, k1, true)
    }

    /// A 64-bit-output hasher keyed by `(k0, k1)`.
    #[cfg(test)]
    pub fn new_64(k0: u64, k1: u64) -> Self {
        Self::with_keys(k0, k1, false)
    }

    fn with_keys(k0: u64, k1: u64, wide: bool) -> Self {
        Self {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            v1: k1 ^ 0x646f_7261_6e64_6f6d ^ if wide { 0xee } else { 0 },
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
            tail: 0,
            tail_len: 0,
            length: 0,
            wide,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13);
        self.v1 ^= self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16);
        self.v3 ^= self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21);
        self.v3 ^= self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17);
        self.v1 ^= self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, word: u64) {
        self.v3 ^= word;
        for _ in 0..C {
            self.round();
        }
        self.v0 ^= word;
    }

    /// Feeds `bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) {
        self.length = self.length.wrapping_add(bytes.len());
        if self.tail_len > 0 {
            // Complete the pending word first.
            let take = (8 - self.tail_len).min(bytes.len());
            for (offset, &byte) in bytes[..take].iter().enumerate() {
                self.tail |= u64::from(byte) << (8 * (self.tail_len + offset));
            }
            self.tail_len += take;
            bytes = &bytes[take..];
            if self.tail_len < 8 {
                return;
            }
            let word = self.tail;
            self.compress(word);
            self.tail = 0;
            self.tail_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for chunk in words.by_ref() {
            let mut word = [0_u8; 8];
            word.copy_from_slice(chunk);
            self.compress(u64::from_le_bytes(word));
        }
        for (offset, &byte) in words.remainder().iter().enumerate() {
            self.tail |= u64::from(byte) << (8 * offset);
        }
        self.tail_len = words.remainder().len();
    }

    fn finalize_rounds(&mut self) {
        for _ in 0..D {
            self.round();
        }
    }

    /// The last block (pending bytes and the length's low byte) and the first finalization.
    fn finish_first(&mut self) -> u64 {
        let last = ((self.length as u64 & 0xff) << 56) | self.tail;
        self.compress(last);
        self.v2 ^= if self.wide { 0xee } else { 0xff };
        self.finalize_rounds();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }

    /// The 64-bit hash (of a hasher made with `new_64`).
    #[cfg(test)]
    pub fn finish_64(mut self) -> u64 {
        self.finish_first()
    }

    /// The 128-bit hash as two little-endian halves (of a hasher made with `new_128`):
    /// bytes 0..8 of the reference output are the first half, 8..16 the second.
    pub fn finish_128(mut self) -> (u64, u64) {
        let first = self.finish_first();
        self.v1 ^= 0xdd;
        self.finalize_rounds();
        (first, self.v0 ^ self.v1 ^ self.v2 ^ self.v3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hasher;

    /// The reference key `00 01 .. 0f`.
    const K0: u64 = 0x0706_0504_0302_0100;
    const K1: u64 = 0x0f0e_0d0c_0b0a_0908;

    fn reference_input(len: usize) -> Vec<u8> {
        (0..len as u8).collect()
    }

    fn halves(bytes: [u8; 16]) -> (u64, u64) {
        let mut first = [0_u8; 8];
        let mut second = [0_u8; 8];
        first.copy_from_slice(&bytes[..8]);
        second.copy_from_slice(&bytes[8..]);
        (u64::from_le_bytes(first), u64::from_le_bytes(second))
    }

    #[test]
    fn siphash_2_4_matches_the_reference_vectors() {
        // `vectors_sip64` of the reference implementation, inputs of 0, 1, 2 and 15 bytes.
        for (len, expected) in [
            (0, 0x726f_db47_dd0e_0e31_u64),
            (1, 0x74f8_39c5_93dc_67fd),
            (2, 0x0d6c_8009_d9a9_4f5a),
            (15, 0xa129_ca61_49be_45e5),
        ] {
            let mut hasher = SipHasher::<2, 4>::new_64(K0, K1);
            hasher.write(&reference_input(len));
            assert_eq!(hasher.finish_64(), expected, "length {len}");
        }
        // `vectors_sip128`, inputs of 0 to 3 bytes.
        let wide: [[u8; 16]; 4] = [
            [
                0xa3, 0x81, 0x7f, 0x04, 0xba, 0x25, 0xa8, 0xe6, 0x6d, 0xf6, 0x72, 0x14, 0xc7, 0x55,
                0x02, 0x93,
            ],
            [
                0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b, 0x22,
                0xfc, 0x45,
            ],
            [
                0x81, 0x77, 0x22, 0x8d, 0xa4, 0xa4, 0x5d, 0xc7, 0xfc, 0xa3, 0x8b, 0xde, 0xf6, 0x0a,
                0xff, 0xe4,
            ],
            [
                0x9c, 0x70, 0xb6, 0x0c, 0x52, 0x67, 0xa9, 0x4e, 0x5f, 0x33, 0xb6, 0xb0, 0x29, 0x85,
                0xed, 0x51,
            ],
        ];
        for (len, expected) in wide.into_iter().enumerate() {
            let mut hasher = SipHasher::<2, 4>::new_128(K0, K1);
            hasher.write(&reference_input(len));
            assert_eq!(hasher.finish_128(), halves(expected), "length {len}");
        }
    }

    #[test]
    fn siphash_1_3_matches_the_standard_library() {
        // `DefaultHasher::new()` is SipHash-1-3 with the zero key, and `write` of bytes
        // feeds them as they are.
        let input: Vec<u8> = (0..300_u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 255, 256, 300] {
            let mut ours = SipHasher13::new_64(0, 0);
            ours.write(&input[..len]);
            let mut std = std::hash::DefaultHasher::new();
            std.write(&input[..len]);
            assert_eq!(ours.finish_64(), std.finish(), "length {len}");
        }
    }

    #[test]
    fn split_writes_give_the_one_shot_hash() {
        let input: Vec<u8> = (0..200_u32).map(|i| (i * 91 + 3) as u8).collect();
        let mut whole = SipHasher13::new_128(K0, K1);
        whole.write(&input);
        let whole = whole.finish_128();
        for pieces in [[1, 2, 3], [7, 8, 9], [0, 13, 100], [64, 0, 0], [5, 5, 190]] {
            let mut split = SipHasher13::new_128(K0, K1);
            let mut rest = input.as_slice();
            for piece in pieces {
                let (head, tail) = rest.split_at(piece.min(rest.len()));
                split.write(head);
                rest = tail;
            }
            split.write(rest);
            assert_eq!(split.finish_128(), whole, "{pieces:?}");
        }
        // Different keys, different digests; the halves differ.
        let mut other = SipHasher13::new_128(K0 ^ 1, K1);
        other.write(&input);
        let other = other.finish_128();
        assert_ne!(other, whole);
        assert_ne!(whole.0, whole.1);
    }
}

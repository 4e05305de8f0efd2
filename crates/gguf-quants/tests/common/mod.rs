//! Shared helpers of the integration tests.
#![allow(dead_code)]

use gguf_quants::QuantType;

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 32) as u8).collect()
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Random block bytes of `ty` whose f16 / f32 scales are finite and moderate (so that the
/// weights are finite), for accuracy tests. Float types get finite values in [-2, 2].
pub fn finite_blocks(ty: QuantType, rng: &mut Rng, blocks: usize) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut data = rng.bytes(blocks * bb);
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for b in data.chunks_exact_mut(bb) {
        let put16 = |at: usize, b: &mut [u8], v: f32| b[at..at + 2].copy_from_slice(&f16(v));
        let s = rng.f32() * 0.1;
        let s2 = rng.f32() * 0.1;
        match ty {
            QuantType::F32 => b.copy_from_slice(&(rng.f32() * 2.0).to_le_bytes()),
            QuantType::F16 => put16(0, b, rng.f32() * 2.0),
            QuantType::Bf16 => {
                let v = (rng.f32() * 2.0).to_bits() >> 16;
                b.copy_from_slice(&(v as u16).to_le_bytes());
            }
            QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 | QuantType::Iq4Nl => {
                put16(0, b, s)
            }
            QuantType::Iq4Xs => put16(0, b, s),
            QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4K | QuantType::Q5K => {
                put16(0, b, s);
                put16(2, b, s2);
            }
            QuantType::Q2K => {
                put16(80, b, s);
                put16(82, b, s2);
            }
            QuantType::Q3K => put16(108, b, s),
            QuantType::Q6K => put16(208, b, s),
            QuantType::Q8K => b[..4].copy_from_slice(&s.to_le_bytes()),
            _ => {}
        }
    }
    data
}

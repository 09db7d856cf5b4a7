//! The synthetic cache contents the bench writes and later checks: every
//! 8-byte word of every chunk (layer, K/V, GPU block) is a hash of the seed,
//! the chunk's identity and the word's index, so a lost, torn, shifted or
//! misplaced chunk, and a block loaded into the wrong GPU slot, all show up.

use super::layout::CacheGeometry;

/// The chunk's identity as one number.
fn chunk_key(geom: &CacheGeometry, layer: u64, kv: u64, gpu_block: u64) -> u64 {
    (layer * 2 + kv) * geom.num_gpu_blocks + gpu_block
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(seed: u64, key: u64, index: u64) -> u64 {
    splitmix(seed ^ splitmix(key.wrapping_mul(0x1_0000_0001).wrapping_add(index)))
}

/// Writes the expected contents of chunk (layer, kv, gpu_block) into `out`
/// (`chunk_bytes` long; a tail shorter than 8 bytes takes the low bytes).
pub fn fill_chunk(
    geom: &CacheGeometry,
    seed: u64,
    layer: u64,
    kv: u64,
    gpu_block: u64,
    out: &mut [u8],
) {
    let key = chunk_key(geom, layer, kv, gpu_block);
    for (i, w) in out.chunks_mut(8).enumerate() {
        let v = word(seed, key, i as u64).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// The first byte offset in `got` that differs from the expected chunk.
pub fn check_chunk(
    geom: &CacheGeometry,
    seed: u64,
    layer: u64,
    kv: u64,
    gpu_block: u64,
    got: &[u8],
) -> Option<usize> {
    let key = chunk_key(geom, layer, kv, gpu_block);
    for (i, w) in got.chunks(8).enumerate() {
        let v = word(seed, key, i as u64).to_le_bytes();
        if w != &v[..w.len()] {
            let at = w
                .iter()
                .zip(v.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(i * 8 + at);
        }
    }
    None
}

/// Fills one whole layer tensor image (`geom.layer_bytes()` long).
pub fn fill_layer(geom: &CacheGeometry, seed: u64, layer: u64, out: &mut [u8]) {
    let chunk = geom.shape.chunk_bytes() as usize;
    for (i, c) in out.chunks_mut(chunk).enumerate() {
        let i = i as u64;
        fill_chunk(
            geom,
            seed,
            layer,
            i / geom.num_gpu_blocks,
            i % geom.num_gpu_blocks,
            c,
        );
    }
}

/// Checks the GPU blocks `blocks` of one layer tensor image; returns the
/// first bad (kv, gpu block, byte offset in the chunk).
pub fn check_layer(
    geom: &CacheGeometry,
    seed: u64,
    layer: u64,
    image: &[u8],
    blocks: &[u64],
) -> Option<(u64, u64, usize)> {
    let chunk = geom.shape.chunk_bytes();
    for kv in 0..2 {
        for &b in blocks {
            let off = geom.device_offset(kv, b) as usize;
            let got = &image[off..off + chunk as usize];
            if let Some(at) = check_chunk(geom, seed, layer, kv, b, got) {
                return Some((kv, b, at));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::layout::{Dtype, KvShape};

    fn geom() -> CacheGeometry {
        let shape = KvShape::new(2, 1, 3, Dtype::Fp8, 3, 6).expect("shape");
        // 9-byte chunks: exercises the short tail word.
        CacheGeometry::new(shape, 4).expect("geom")
    }

    #[test]
    fn chunks_differ_and_check_finds_every_byte() {
        let g = geom();
        let mut layer = vec![0u8; g.layer_bytes() as usize];
        fill_layer(&g, 7, 1, &mut layer);
        let all: Vec<u64> = (0..4).collect();
        assert_eq!(check_layer(&g, 7, 1, &layer, &all), None);
        assert_ne!(
            check_layer(&g, 7, 0, &layer, &all),
            None,
            "layer 0 differs from 1"
        );
        assert_ne!(check_layer(&g, 8, 1, &layer, &all), None, "seed matters");
        for byte in 0..layer.len() {
            let mut bad = layer.clone();
            bad[byte] ^= 0x10;
            let chunk = g.shape.chunk_bytes() as usize;
            let (i, at) = (byte / chunk, byte % chunk);
            let (kv, b) = (i as u64 / 4, i as u64 % 4);
            assert_eq!(check_layer(&g, 7, 1, &bad, &all), Some((kv, b, at)));
        }
    }

    #[test]
    fn swapped_chunks_are_caught() {
        let g = geom();
        let c = g.shape.chunk_bytes() as usize;
        let mut a = vec![0u8; c];
        let mut b = vec![0u8; c];
        fill_chunk(&g, 1, 0, 0, 1, &mut a);
        fill_chunk(&g, 1, 0, 0, 2, &mut b);
        assert_ne!(a, b);
        assert_eq!(check_chunk(&g, 1, 0, 0, 1, &a), None);
        assert_eq!(check_chunk(&g, 1, 0, 0, 1, &b), Some(0));
    }
}

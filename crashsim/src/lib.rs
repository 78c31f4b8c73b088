//! A crash model for a device with a volatile write cache.
//!
//! Owns [`CacheDisk`]: the bytes a device shows to its reader, the bytes that are durable, and
//! the log of writes completed since the last flush. A crash keeps the durable bytes and, from
//! the log, any subset of io units of any writes, applied in the order they were issued: a
//! write-back cache may lose any unflushed write, and a multi-unit write may tear at io-unit
//! granularity. [`CacheDisk::crash_image`] builds one such image from a [`CrashPlan`].
//!
//! It knows nothing about devices, block layers or blobstores: both the blobstore's test device
//! and bdev-core's cached malloc wrap it, so the two layers are tested with one model. It has
//! no dependencies (its random choices come from a seeded [`SplitMix64`]), so a crash state is
//! reproducible from its seed.

/// One write completed since the last flush.
#[derive(Clone, Debug)]
struct Pending {
    offset: usize,
    data: Vec<u8>,
}

/// Which unflushed writes a crash keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPlan {
    /// Every unflushed write is lost (the cache was never written back).
    LoseAll,
    /// Every unflushed write survives (an in-order cut after the last write).
    KeepAll,
    /// The writes issued before the `n`-th survive, the rest are lost (an in-order cut).
    Prefix(usize),
    /// Each unflushed write is, with a [`SplitMix64`] seeded with this value, lost whole (one
    /// time in four), kept whole (one in four) or torn (each of its io units kept or lost with
    /// probability one half): lost writes in any subset, and torn writes.
    Random(u64),
}

/// A small, fast, seedable generator (Steele, Lea and Flood's SplitMix64).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A device image behind a volatile write cache.
#[derive(Clone, Debug)]
pub struct CacheDisk {
    /// What a reader sees now: durable bytes plus every completed write.
    visible: Vec<u8>,
    /// What survives a crash for certain.
    durable: Vec<u8>,
    /// Writes completed since the last flush, in completion order.
    pending: Vec<Pending>,
    /// The unit a write tears at (the device's atomic write unit).
    io_unit: usize,
    /// Flushes completed so far.
    flushes: u64,
}

impl CacheDisk {
    /// A device over `bytes`, all of them durable, tearing at `io_unit` bytes (> 0).
    pub fn new(bytes: Vec<u8>, io_unit: usize) -> Self {
        CacheDisk {
            durable: bytes.clone(),
            visible: bytes,
            pending: Vec::new(),
            io_unit: io_unit.max(1),
            flushes: 0,
        }
    }
    /// The bytes a reader sees now.
    pub fn visible(&self) -> &[u8] {
        &self.visible
    }
    /// The bytes that survive a crash for certain.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.visible.len()
    }
    /// True for an empty device.
    pub fn is_empty(&self) -> bool {
        self.visible.is_empty()
    }
    /// Writes completed since the last flush.
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }
    /// Flushes completed so far.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }
    /// Records a completed write of `data` at byte `offset`. Panics if it does not fit (the
    /// caller checks bounds and answers EINVAL first).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        self.visible[offset..offset + data.len()].copy_from_slice(data);
        self.pending.push(Pending {
            offset,
            data: data.to_vec(),
        });
    }
    /// Records a completed write of `len` zero bytes at `offset` (write_zeroes, an unmap that
    /// zeroes).
    pub fn write_zeroes(&mut self, offset: usize, len: usize) {
        self.write(offset, &vec![0; len]);
    }
    /// A completed flush: everything visible is durable.
    pub fn flush(&mut self) {
        // Apply the log rather than copying the whole image: a flush costs what was written
        // since the last one, not the size of the device.
        for w in self.pending.drain(..) {
            self.durable[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
        }
        self.flushes += 1;
    }
    /// Grows or shrinks the device (new bytes are zeroes and durable at once).
    pub fn resize(&mut self, len: usize) {
        self.visible.resize(len, 0);
        self.durable.resize(len, 0);
        self.pending.retain(|p| p.offset + p.data.len() <= len);
    }
    /// The image a power cut would leave now under `plan`.
    pub fn crash_image(&self, plan: CrashPlan) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut rng = match plan {
            CrashPlan::Random(seed) => Some(SplitMix64::new(seed)),
            _ => None,
        };
        for (i, w) in self.pending.iter().enumerate() {
            match plan {
                CrashPlan::LoseAll => break,
                CrashPlan::Prefix(n) if i >= n => break,
                CrashPlan::KeepAll | CrashPlan::Prefix(_) => {
                    img[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
                }
                CrashPlan::Random(_) => {
                    let rng = rng.as_mut().expect("seeded above");
                    match rng.below(4) {
                        0 => continue,
                        1 => {
                            img[w.offset..w.offset + w.data.len()].copy_from_slice(&w.data);
                            continue;
                        }
                        _ => {}
                    }
                    // Torn. Units are aligned to the device, not to the write.
                    let mut pos = 0;
                    while pos < w.data.len() {
                        let abs = w.offset + pos;
                        let unit_end = (abs / self.io_unit + 1) * self.io_unit;
                        let n = (unit_end - abs).min(w.data.len() - pos);
                        if rng.next_u64() & 1 == 1 {
                            img[abs..abs + n].copy_from_slice(&w.data[pos..pos + n]);
                        }
                        pos += n;
                    }
                }
            }
        }
        img
    }
    /// Replaces the state by a crash image under `plan`: the device after power returns
    /// (everything durable, nothing pending).
    pub fn crash(&mut self, plan: CrashPlan) {
        let img = self.crash_image(plan);
        self.visible.copy_from_slice(&img);
        self.durable = img;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_writes_survive_every_plan_and_unflushed_ones_may_not() {
        let mut d = CacheDisk::new(vec![0; 16], 4);
        d.write(0, &[1; 4]);
        d.flush();
        d.write(4, &[2; 4]);
        assert_eq!(&d.visible()[..8], &[1, 1, 1, 1, 2, 2, 2, 2]);
        for plan in [
            CrashPlan::LoseAll,
            CrashPlan::KeepAll,
            CrashPlan::Prefix(0),
            CrashPlan::Random(7),
        ] {
            assert_eq!(&d.crash_image(plan)[..4], &[1; 4], "{plan:?}");
        }
        assert_eq!(&d.crash_image(CrashPlan::LoseAll)[4..8], &[0; 4]);
        assert_eq!(&d.crash_image(CrashPlan::KeepAll)[4..8], &[2; 4]);
    }

    #[test]
    fn prefix_keeps_writes_in_issue_order() {
        let mut d = CacheDisk::new(vec![0; 8], 4);
        d.write(0, &[1; 4]);
        d.write(0, &[2; 4]);
        d.write(4, &[3; 4]);
        assert_eq!(
            d.crash_image(CrashPlan::Prefix(1)),
            [1, 1, 1, 1, 0, 0, 0, 0]
        );
        assert_eq!(
            d.crash_image(CrashPlan::Prefix(2)),
            [2, 2, 2, 2, 0, 0, 0, 0]
        );
        assert_eq!(d.crash_image(CrashPlan::KeepAll), [2, 2, 2, 2, 3, 3, 3, 3]);
    }

    #[test]
    fn random_plans_lose_subsets_and_tear_at_io_units() {
        let mut d = CacheDisk::new(vec![0; 64], 8);
        d.write(0, &[9; 64]);
        let mut seen_torn = false;
        let mut seen_whole = false;
        let mut seen_lost = false;
        for seed in 0..64 {
            let img = d.crash_image(CrashPlan::Random(seed));
            // Every io unit is all old or all new: tears only at unit boundaries.
            for unit in img.chunks(8) {
                assert!(unit.iter().all(|&b| b == unit[0]), "torn inside a unit");
            }
            let kept = img.chunks(8).filter(|u| u[0] == 9).count();
            seen_torn |= kept > 0 && kept < 8;
            seen_whole |= kept == 8;
            seen_lost |= kept == 0;
        }
        assert!(seen_torn, "no torn write in 64 seeds");
        assert!(
            seen_whole || seen_lost,
            "neither whole nor lost in 64 seeds"
        );
        // Same seed, same image.
        assert_eq!(
            d.crash_image(CrashPlan::Random(5)),
            d.crash_image(CrashPlan::Random(5))
        );
    }

    #[test]
    fn crash_makes_the_image_the_new_durable_state() {
        let mut d = CacheDisk::new(vec![0; 8], 4);
        d.write(0, &[1; 8]);
        d.crash(CrashPlan::LoseAll);
        assert_eq!(d.visible(), &[0; 8]);
        assert_eq!(d.pending_writes(), 0);
        d.write(4, &[5; 4]);
        d.flush();
        assert_eq!(d.crash_image(CrashPlan::LoseAll), [0, 0, 0, 0, 5, 5, 5, 5]);
        assert_eq!(d.flushes(), 1);
    }
}

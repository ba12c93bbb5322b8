//! A fault-injecting provider wrapper, for tests and benchmarks.
//!
//! It sits in front of any provider and, per call kind, adds latency, throttles or times out a
//! share of calls (from a seeded generator, so a failing run can be replayed), denies access,
//! plays dead, or fails the next N calls with a given error. It is how the suite exercises what
//! a real KMS does under load without one, and how benchmarks model KMS round-trip latency.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{KeyError, KeyErrorKind, KeyProvider, KmsOp};
use crate::format::context::EncryptionContext;
use crate::format::envelope::WrappedKey;
use crate::secret::DataKey;

/// What to do to calls of one kind.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added before every call.
    pub latency: Duration,
    /// Calls out of 1000 answered with `Throttled`.
    pub throttle_per_mille: u32,
    /// Calls out of 1000 that hang for `timeout_after` and then fail with `Timeout`.
    pub timeout_per_mille: u32,
    pub timeout_after: Duration,
    /// Every call fails with `AccessDenied`.
    pub deny: bool,
    /// Every call fails with `Unavailable` (the service is down).
    pub unavailable: bool,
    /// The next calls fail with these kinds, in order, before any other rule applies.
    pub fail_next: VecDeque<KeyErrorKind>,
    /// Once this many calls of the kind have reached the wrapper (counting from its creation),
    /// every further one fails with `AccessDenied`: access revoked in the middle of a job.
    pub deny_after: Option<u64>,
    /// The service is down (`Unavailable`) from this long after the wrapper was made, for
    /// the second duration: an outage that ends by itself.
    pub outage: Option<(Duration, Duration)>,
    /// Calls whose encryption context mentions this text (one file's, by its stored path)
    /// take this long before they are answered: a key service stuck on one call.
    pub hang: Option<(String, Duration)>,
}

impl Faults {
    /// Parses `latency_ms=5,throttle=200,timeout=50,timeout_ms=300,down_at_s=3,down_for_s=10`
    /// (throttle and timeout in calls per 1000; every part optional), the form of
    /// `KMSFS_INJECT_KMS_FAULTS`.
    pub fn parse(spec: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        let (mut down_at, mut down_for) = (None, None);
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not NAME=NUMBER"))?;
            let n: u64 = value
                .parse()
                .map_err(|_| format!("'{value}' in '{part}' is not a number"))?;
            match name {
                "latency_ms" => f.latency = Duration::from_millis(n),
                "throttle" => f.throttle_per_mille = n.min(1000) as u32,
                "timeout" => f.timeout_per_mille = n.min(1000) as u32,
                "timeout_ms" => f.timeout_after = Duration::from_millis(n),
                "down_at_s" => down_at = Some(Duration::from_secs(n)),
                "down_for_s" => down_for = Some(Duration::from_secs(n)),
                _ => return Err(format!("unknown fault '{name}'")),
            }
        }
        if let (Some(at), Some(len)) = (down_at, down_for) {
            f.outage = Some((at, len));
        }
        Ok(f)
    }
}

pub struct FaultyProvider {
    inner: Arc<dyn KeyProvider>,
    default: Mutex<Faults>,
    per_op: Mutex<HashMap<KmsOp, Faults>>,
    rng: Mutex<u64>,
    calls: [AtomicU64; 5],
    made: std::time::Instant,
}

impl FaultyProvider {
    pub fn new(inner: Arc<dyn KeyProvider>, seed: u64) -> Self {
        FaultyProvider {
            inner,
            default: Mutex::new(Faults::default()),
            per_op: Mutex::new(HashMap::new()),
            rng: Mutex::new(seed | 1),
            calls: Default::default(),
            made: std::time::Instant::now(),
        }
    }

    /// Sets the faults of one call kind, or of all kinds without their own (`None`).
    pub fn set(&self, op: Option<KmsOp>, faults: Faults) {
        match op {
            Some(op) => {
                self.per_op.lock().unwrap().insert(op, faults);
            }
            None => *self.default.lock().unwrap() = faults,
        }
    }

    /// Clears every fault.
    pub fn heal(&self) {
        self.per_op.lock().unwrap().clear();
        *self.default.lock().unwrap() = Faults::default();
    }

    /// Calls of `op` that reached this wrapper (including the ones it failed).
    pub fn calls(&self, op: KmsOp) -> u64 {
        self.calls[op as usize].load(Ordering::Relaxed)
    }

    fn roll(&self) -> u32 {
        let mut s = self.rng.lock().unwrap();
        // xorshift64*: deterministic for a seed, good enough to pick failures.
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as u32 % 1000
    }

    /// Applies the faults for `op`; `Err` means the call fails without reaching the provider.
    /// `contexts`: the call's encryption contexts (a ReEncrypt's two), for `hang`.
    fn inject(
        &self,
        op: KmsOp,
        key_id: &str,
        contexts: &[&EncryptionContext],
    ) -> Result<(), KeyError> {
        let earlier = self.calls[op as usize].fetch_add(1, Ordering::Relaxed);
        let (latency, outcome) = {
            let mut per_op = self.per_op.lock().unwrap();
            let mut default = self.default.lock().unwrap();
            let f = per_op.get_mut(&op).unwrap_or(&mut default);
            let outcome = if let Some(kind) = f.fail_next.pop_front() {
                Some((kind, Duration::ZERO))
            } else if f.deny || f.deny_after.is_some_and(|n| earlier >= n) {
                Some((KeyErrorKind::AccessDenied, Duration::ZERO))
            } else if f.unavailable
                || f.outage.is_some_and(|(at, len)| {
                    let t = self.made.elapsed();
                    t >= at && t < at + len
                })
            {
                Some((KeyErrorKind::Unavailable, Duration::ZERO))
            } else {
                let (throttle, timeout, after) =
                    (f.throttle_per_mille, f.timeout_per_mille, f.timeout_after);
                let roll = if throttle + timeout > 0 {
                    self.roll()
                } else {
                    1000
                };
                if roll < throttle {
                    Some((KeyErrorKind::Throttled, Duration::ZERO))
                } else if roll < throttle + timeout {
                    Some((KeyErrorKind::Timeout, after))
                } else {
                    None
                }
            };
            let stuck = f
                .hang
                .as_ref()
                .filter(|(text, _)| {
                    contexts
                        .iter()
                        .any(|ctx| format!("{ctx:?}").contains(text.as_str()))
                })
                .map_or(Duration::ZERO, |(_, long)| *long);
            (f.latency + stuck, outcome)
        };
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        match outcome {
            None => Ok(()),
            Some((kind, hang)) => {
                if !hang.is_zero() {
                    std::thread::sleep(hang);
                }
                Err(KeyError::new(kind, op, key_id, "injected fault"))
            }
        }
    }
}

impl KeyProvider for FaultyProvider {
    fn generate_data_key(
        &self,
        key_id: &str,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        self.inject(KmsOp::GenerateDataKey, key_id, &[ctx])?;
        self.inner.generate_data_key(key_id, ctx)
    }

    fn encrypt(
        &self,
        key_id: &str,
        key: &DataKey,
        ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.inject(KmsOp::Encrypt, key_id, &[ctx])?;
        self.inner.encrypt(key_id, key, ctx)
    }

    fn decrypt(&self, wrapped: &WrappedKey, ctx: &EncryptionContext) -> Result<DataKey, KeyError> {
        self.inject(KmsOp::Decrypt, &wrapped.key_id, &[ctx])?;
        self.inner.decrypt(wrapped, ctx)
    }

    fn re_encrypt(
        &self,
        wrapped: &WrappedKey,
        from_ctx: &EncryptionContext,
        to_key_id: &str,
        to_ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        self.inject(KmsOp::ReEncrypt, &wrapped.key_id, &[from_ctx, to_ctx])?;
        self.inner.re_encrypt(wrapped, from_ctx, to_key_id, to_ctx)
    }

    fn can_re_encrypt(&self, from_key: &str, to_key: &str) -> bool {
        self.inner.can_re_encrypt(from_key, to_key)
    }
}

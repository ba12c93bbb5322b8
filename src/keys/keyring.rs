//! A volume's trusted keys, and the one place kmsfs calls key providers from.
//!
//! The keyring holds the volume's trusted keys in preference order, each with the provider
//! that serves it. It refuses any envelope under a key outside that set before a provider sees
//! it (Decrypt always names a trusted key), generates new data keys under the first key and
//! wraps them under the others, tries unwraps in preference order falling over on transient
//! failures, and gives every call the same treatment: a concurrency limit, retries with
//! full-jitter exponential backoff on throttling / timeouts / unavailability, an overall
//! deadline so no caller blocks forever, statistics, and a debug log line per call (operation,
//! key, context, latency; never key bytes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;

use super::cache::{CacheConfig, CacheKey, CacheStats, KeyCache};
use super::{KeyError, KeyErrorKind, KeyProvider, KmsOp};
use crate::format::context::EncryptionContext;
use crate::format::envelope::WrappedKey;
use crate::secret::DataKey;

/// How transient failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// No call (all attempts and pauses together) runs longer than this.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            deadline: Duration::from_secs(15),
        }
    }
}

pub const DEFAULT_CONCURRENCY: usize = 64;

/// One trusted key and the provider that serves it.
#[derive(Clone)]
pub struct TrustedProvider {
    pub key_id: String,
    pub provider: Arc<dyn KeyProvider>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpStats {
    /// Requests sent to the provider (each retry counts).
    pub requests: u64,
    pub failures: u64,
    pub retries: u64,
    pub total_latency_us: u64,
}

#[derive(Default)]
struct OpCounters {
    requests: AtomicU64,
    failures: AtomicU64,
    retries: AtomicU64,
    latency_us: AtomicU64,
}

/// A counting semaphore bounding concurrent provider calls.
struct Limiter {
    free: Mutex<usize>,
    released: Condvar,
}

impl Limiter {
    fn acquire(&self, until: Instant) -> bool {
        let mut free = self.free.lock().unwrap();
        while *free == 0 {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            free = self.released.wait_timeout(free, until - now).unwrap().0;
        }
        *free -= 1;
        true
    }

    fn release(&self) {
        *self.free.lock().unwrap() += 1;
        self.released.notify_one();
    }
}

/// Re-reads the volume's trusted keys when they may have changed (`kmsfs rewrap` beside a
/// mount), given the current ones (whose providers it can reuse). Called with `force` when a
/// key the keyring does not know turns up, else only cheaply (the hook checks whether the
/// config changed). None: nothing new.
pub type KeyReload =
    Box<dyn Fn(bool, &[TrustedProvider]) -> Option<Vec<TrustedProvider>> + Send + Sync>;

pub struct Keyring {
    keys: RwLock<Arc<Vec<TrustedProvider>>>,
    reload: Option<KeyReload>,
    cache: KeyCache,
    retry: RetryPolicy,
    limiter: Limiter,
    concurrency: usize,
    ops: [OpCounters; 5],
}

impl Keyring {
    pub fn new(
        keys: Vec<TrustedProvider>,
        cache: CacheConfig,
        retry: RetryPolicy,
        concurrency: usize,
    ) -> std::io::Result<Self> {
        assert!(!keys.is_empty(), "a keyring needs at least one trusted key");
        Ok(Keyring {
            keys: RwLock::new(Arc::new(keys)),
            reload: None,
            cache: KeyCache::new(cache)?,
            retry,
            limiter: Limiter {
                free: Mutex::new(concurrency.max(1)),
                released: Condvar::new(),
            },
            concurrency: concurrency.max(1),
            ops: Default::default(),
        })
    }

    /// Most provider calls in flight at once (what a caller fanning out calls can use).
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Sets how to re-read the trusted keys (see [`KeyReload`]).
    pub fn set_reload(&mut self, reload: KeyReload) {
        self.reload = Some(reload);
    }

    /// Whether every trusted key is answered in this process (the local provider).
    pub fn answers_in_process(&self) -> bool {
        self.keys().iter().all(|k| k.provider.answers_in_process())
    }

    fn keys(&self) -> Arc<Vec<TrustedProvider>> {
        self.keys.read().unwrap().clone()
    }

    /// Asks the reload hook for the current trusted keys; says whether they changed.
    fn refresh(&self, force: bool) -> bool {
        let Some(reload) = &self.reload else {
            return false;
        };
        let current = self.keys();
        match reload(force, &current) {
            Some(keys) if !keys.is_empty() => {
                let ids: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
                tracing::info!(keys = ?ids, "trusted keys changed on disk; reloaded");
                *self.keys.write().unwrap() = Arc::new(keys);
                true
            }
            _ => false,
        }
    }

    pub fn key_ids(&self) -> Vec<String> {
        self.keys().iter().map(|k| k.key_id.clone()).collect()
    }

    /// Replaces the trusted keys, in preference order (once the config naming them is
    /// authenticated: before that, a volume's keyring holds only the keys it may reach).
    pub fn set_keys(&self, keys: Vec<TrustedProvider>) {
        assert!(!keys.is_empty(), "a keyring needs at least one trusted key");
        *self.keys.write().unwrap() = Arc::new(keys);
    }

    /// Trusts one more key, first in preference order (new data keys are generated under it).
    pub fn add_first(&self, key: TrustedProvider) {
        let mut keys = self.keys.write().unwrap();
        let mut list: Vec<TrustedProvider> = keys
            .iter()
            .filter(|k| k.key_id != key.key_id)
            .cloned()
            .collect();
        list.insert(0, key);
        *keys = Arc::new(list);
    }

    /// Stops trusting `key_id` (at least one key always stays).
    pub fn remove(&self, key_id: &str) {
        let mut keys = self.keys.write().unwrap();
        if keys.len() > 1 {
            let list: Vec<TrustedProvider> = keys
                .iter()
                .filter(|k| k.key_id != key_id)
                .cloned()
                .collect();
            *keys = Arc::new(list);
        }
    }

    pub fn is_trusted(&self, key_id: &str) -> bool {
        self.keys().iter().any(|k| k.key_id == key_id)
    }

    /// The provider of a trusted key; a key not (yet) known makes the keyring reload once.
    fn provider(&self, key_id: &str) -> Option<Arc<dyn KeyProvider>> {
        let find = || {
            self.keys()
                .iter()
                .find(|k| k.key_id == key_id)
                .map(|k| k.provider.clone())
        };
        find().or_else(|| if self.refresh(true) { find() } else { None })
    }

    /// Runs one provider call with the concurrency limit, retries and deadline.
    fn call<T>(
        &self,
        op: KmsOp,
        key_id: &str,
        ctx: &EncryptionContext,
        f: impl Fn() -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        self.call_with(self.retry.max_attempts, op, key_id, ctx, f)
    }

    fn call_with<T>(
        &self,
        max_attempts: u32,
        op: KmsOp,
        key_id: &str,
        ctx: &EncryptionContext,
        f: impl Fn() -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let policy = RetryPolicy {
            max_attempts,
            ..self.retry
        };
        let until = Instant::now() + self.retry.deadline;
        let counters = &self.ops[op as usize];
        let attempt = |n: u32| {
            if !self.limiter.acquire(until) {
                return Err(KeyError::new(
                    KeyErrorKind::Timeout,
                    op,
                    key_id,
                    format!("no free KMS slot within {:?}", self.retry.deadline),
                ));
            }
            let t0 = Instant::now();
            let result = f();
            self.limiter.release();
            let took = t0.elapsed();
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters
                .latency_us
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
            if n > 1 {
                counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            if result.is_err() {
                counters.failures.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(
                op = %op, key = key_id, context = %ctx.describe(), attempt = n,
                latency_us = took.as_micros() as u64,
                outcome = %result.as_ref().map_or_else(|e| e.kind.to_string(), |_| "ok".into()),
                "kms call"
            );
            result
        };
        with_retries(&policy, until, attempt)
    }

    /// A new data key under the first trusted key, also wrapped under every other one.
    pub fn generate(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, Vec<WrappedKey>), KeyError> {
        self.refresh(false);
        let keys = self.keys();
        let primary = &keys[0];
        let (dek, first) = self.call(KmsOp::GenerateDataKey, &primary.key_id, ctx, || {
            primary.provider.generate_data_key(&primary.key_id, ctx)
        })?;
        let mut wrapped = vec![first];
        // A file is usually read soon after it is written: its key is in hand now.
        self.cache.insert(CacheKey::new(&wrapped[0], ctx), &dek);
        for k in &keys[1..] {
            wrapped.push(self.call(KmsOp::Encrypt, &k.key_id, ctx, || {
                k.provider.encrypt(&k.key_id, &dek, ctx)
            })?);
        }
        Ok((dek, wrapped))
    }

    /// Unwraps the data key from whichever of `candidates` works first, in the volume's key
    /// preference order, through the cache. Candidates under untrusted keys are never sent.
    pub fn unwrap(
        &self,
        candidates: &[&WrappedKey],
        ctx: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        let order = |keys: &[TrustedProvider]| {
            let mut ordered: Vec<&WrappedKey> = Vec::new();
            for k in keys {
                ordered.extend(candidates.iter().filter(|w| w.key_id == k.key_id));
            }
            ordered
        };
        let mut ordered = order(&self.keys());
        if ordered.is_empty() && self.refresh(true) {
            ordered = order(&self.keys());
        }
        if ordered.is_empty() {
            let named = candidates
                .iter()
                .map(|w| w.key_id.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(KeyError::new(
                KeyErrorKind::UntrustedKey,
                KmsOp::Decrypt,
                if named.is_empty() { "-" } else { &named },
                "the volume does not trust this key",
            ));
        }
        // With several keys, a first pass gives each one attempt, so an unreachable region
        // fails over at once; only if every key failed transiently do they get retries.
        let passes: &[u32] = if ordered.len() > 1 {
            &[1, u32::MAX]
        } else {
            &[u32::MAX]
        };
        let mut first_err: Option<KeyError> = None;
        for &attempts in passes {
            let attempts = attempts.min(self.retry.max_attempts);
            for w in &ordered {
                let provider = self
                    .provider(&w.key_id)
                    .expect("ordered holds trusted keys only");
                let fetched = self.cache.get_or_fetch(CacheKey::new(w, ctx), || {
                    self.call_with(attempts, KmsOp::Decrypt, &w.key_id, ctx, || {
                        provider.decrypt(w, ctx)
                    })
                });
                match fetched {
                    Ok(dek) => return Ok(dek),
                    Err(e) => {
                        if first_err
                            .as_ref()
                            .is_none_or(|f| f.kind.is_transient() && !e.kind.is_transient())
                        {
                            first_err = Some(e);
                        }
                    }
                }
            }
            if first_err.as_ref().is_some_and(|e| !e.kind.is_transient()) {
                break;
            }
        }
        Err(first_err.expect("at least one candidate was tried"))
    }

    /// Rewraps `wrapped` (made under `from_ctx`) for `to_ctx` under `to_key`. Within one
    /// provider this is a `ReEncrypt` and the data key never enters kmsfs's memory; across
    /// providers (local to KMS) it is a Decrypt then an Encrypt.
    pub fn rewrap(
        &self,
        wrapped: &WrappedKey,
        from_ctx: &EncryptionContext,
        to_key: &str,
        to_ctx: &EncryptionContext,
    ) -> Result<WrappedKey, KeyError> {
        let untrusted = |id: &str| {
            KeyError::new(
                KeyErrorKind::UntrustedKey,
                KmsOp::ReEncrypt,
                id,
                "the volume does not trust this key",
            )
        };
        let from = self
            .provider(&wrapped.key_id)
            .ok_or_else(|| untrusted(&wrapped.key_id))?;
        let to = self.provider(to_key).ok_or_else(|| untrusted(to_key))?;
        if from.can_re_encrypt(&wrapped.key_id, to_key) {
            return self.call(KmsOp::ReEncrypt, &wrapped.key_id, to_ctx, || {
                from.re_encrypt(wrapped, from_ctx, to_key, to_ctx)
            });
        }
        let dek = self.call(KmsOp::Decrypt, &wrapped.key_id, from_ctx, || {
            from.decrypt(wrapped, from_ctx)
        })?;
        self.call(KmsOp::Encrypt, to_key, to_ctx, || {
            to.encrypt(to_key, &dek, to_ctx)
        })
    }

    pub fn op_stats(&self, op: KmsOp) -> OpStats {
        let c = &self.ops[op as usize];
        OpStats {
            requests: c.requests.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            total_latency_us: c.latency_us.load(Ordering::Relaxed),
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    pub fn cache(&self) -> &KeyCache {
        &self.cache
    }
}

/// Runs `attempt(1)`, `attempt(2)`, ... while it fails transiently, pausing between attempts
/// for a random time up to an exponentially growing ceiling (full jitter), until
/// `policy.max_attempts` or the deadline `until`. Every caller of a key service goes through
/// this, inside the keyring or not (DescribeKey at init).
pub fn with_retries<T>(
    policy: &RetryPolicy,
    until: Instant,
    mut attempt: impl FnMut(u32) -> Result<T, KeyError>,
) -> Result<T, KeyError> {
    let mut n = 0;
    loop {
        n += 1;
        let err = match attempt(n) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !err.kind.is_transient() || n >= policy.max_attempts {
            return Err(with_attempts(err, n));
        }
        let ceiling = policy
            .base_delay
            .saturating_mul(1 << (n - 1).min(16))
            .min(policy.max_delay);
        let pause = rand::thread_rng().gen_range(Duration::ZERO..=ceiling);
        if Instant::now() + pause >= until {
            return Err(with_attempts(err, n));
        }
        std::thread::sleep(pause);
    }
}

fn with_attempts(mut err: KeyError, attempts: u32) -> KeyError {
    if attempts > 1 {
        err.detail = if err.detail.is_empty() {
            format!("after {attempts} attempts")
        } else {
            format!("{}; after {attempts} attempts", err.detail)
        };
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::context::CanonicalPath;
    use crate::keys::fault::{Faults, FaultyProvider};
    use crate::keys::local::{LocalKey, LocalProvider};
    use std::collections::BTreeMap;
    use std::path::Path;

    fn ctx(path: &str) -> EncryptionContext {
        EncryptionContext::for_file(
            &[1; 16],
            &CanonicalPath::from_user(Path::new(path)).unwrap(),
            &BTreeMap::new(),
        )
    }

    struct Setup {
        _dir: tempfile::TempDir,
        ids: Vec<String>,
        faulty: Arc<FaultyProvider>,
    }

    fn setup(n: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<LocalKey> = (0..n)
            .map(|i| LocalKey::create(&dir.path().join(format!("k{i}"))).unwrap())
            .collect();
        let ids = keys.iter().map(|k| k.id().to_string()).collect();
        let faulty = Arc::new(FaultyProvider::new(Arc::new(LocalProvider::new(keys)), 7));
        Setup {
            _dir: dir,
            ids,
            faulty,
        }
    }

    fn fast_retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(10),
            deadline: Duration::from_secs(5),
        }
    }

    fn ring(s: &Setup, ids: &[&str], cache: CacheConfig) -> Keyring {
        let keys = ids
            .iter()
            .map(|id| TrustedProvider {
                key_id: id.to_string(),
                provider: s.faulty.clone(),
            })
            .collect();
        Keyring::new(keys, cache, fast_retry(), 4).unwrap()
    }

    /// A loaded machine once made the local provider slow enough for creates to stop waiting
    /// for their keys (and for other mounts not to see them yet): it must say it answers in
    /// process, and a stand-in for a remote service must not.
    #[test]
    fn only_the_local_provider_answers_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<LocalKey> = (0..2)
            .map(|i| LocalKey::create(&dir.path().join(format!("k{i}"))).unwrap())
            .collect();
        let ids: Vec<String> = keys.iter().map(|k| k.id().to_string()).collect();
        let local: Arc<dyn KeyProvider> = Arc::new(LocalProvider::new(keys));
        let remote: Arc<dyn KeyProvider> = Arc::new(FaultyProvider::new(local.clone(), 7));
        let with = |providers: [Arc<dyn KeyProvider>; 2]| {
            let keys = providers
                .into_iter()
                .zip(&ids)
                .map(|(provider, id)| TrustedProvider {
                    key_id: id.clone(),
                    provider,
                })
                .collect();
            Keyring::new(keys, CacheConfig::default(), fast_retry(), 4)
                .unwrap()
                .answers_in_process()
        };
        assert!(with([local.clone(), local.clone()]));
        assert!(!with([local.clone(), remote.clone()]));
        assert!(!with([remote.clone(), remote]));
    }

    #[test]
    fn multi_key_generate_wraps_under_each_key() {
        let s = setup(2);
        let r = ring(&s, &[&s.ids[0], &s.ids[1]], CacheConfig::default());
        let (dek, wrapped) = r.generate(&ctx("f")).unwrap();
        assert_eq!(wrapped.len(), 2);
        assert_eq!(wrapped[1].key_id, s.ids[1]);
        // Either envelope alone opens the key.
        for w in &wrapped {
            let only_second = ring(&s, &[&w.key_id], CacheConfig::default());
            assert_eq!(
                only_second.unwrap(&[w], &ctx("f")).unwrap().expose(),
                dek.expose()
            );
        }
    }

    #[test]
    fn untrusted_key_is_never_sent() {
        let s = setup(2);
        let r_all = ring(&s, &[&s.ids[0], &s.ids[1]], CacheConfig::default());
        let (_, wrapped) = r_all.generate(&ctx("f")).unwrap();
        let r = ring(&s, &[&s.ids[0]], CacheConfig::default());
        let before = s.faulty.calls(KmsOp::Decrypt);
        let err = r.unwrap(&[&wrapped[1]], &ctx("f")).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::UntrustedKey);
        assert_eq!(s.faulty.calls(KmsOp::Decrypt), before);
    }

    #[test]
    fn throttling_is_retried_then_succeeds() {
        let s = setup(1);
        let r = ring(&s, &[&s.ids[0]], CacheConfig::default());
        s.faulty.set(
            Some(KmsOp::GenerateDataKey),
            Faults {
                fail_next: [KeyErrorKind::Throttled; 3].into(),
                ..Default::default()
            },
        );
        r.generate(&ctx("f")).unwrap();
        let st = r.op_stats(KmsOp::GenerateDataKey);
        assert_eq!((st.requests, st.failures, st.retries), (4, 3, 3));
    }

    #[test]
    fn persistent_throttling_gives_up_with_the_right_error() {
        let s = setup(1);
        let r = ring(&s, &[&s.ids[0]], CacheConfig::default());
        s.faulty.set(
            None,
            Faults {
                throttle_per_mille: 1000,
                ..Default::default()
            },
        );
        let err = r.generate(&ctx("f")).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::Throttled);
        assert!(err.to_string().contains("after 5 attempts"), "{err}");
    }

    #[test]
    fn denial_is_not_retried() {
        let s = setup(1);
        let r = ring(&s, &[&s.ids[0]], CacheConfig::default());
        s.faulty.set(
            None,
            Faults {
                deny: true,
                ..Default::default()
            },
        );
        assert_eq!(
            r.generate(&ctx("f")).unwrap_err().kind,
            KeyErrorKind::AccessDenied
        );
        assert_eq!(r.op_stats(KmsOp::GenerateDataKey).requests, 1);
    }

    #[test]
    fn deadline_bounds_a_hanging_service() {
        let s = setup(1);
        let keys = vec![TrustedProvider {
            key_id: s.ids[0].clone(),
            provider: s.faulty.clone(),
        }];
        let policy = RetryPolicy {
            deadline: Duration::from_millis(300),
            ..fast_retry()
        };
        let r = Keyring::new(keys, CacheConfig::default(), policy, 4).unwrap();
        s.faulty.set(
            None,
            Faults {
                timeout_per_mille: 1000,
                timeout_after: Duration::from_millis(100),
                ..Default::default()
            },
        );
        let t0 = Instant::now();
        let err = r.generate(&ctx("f")).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::Timeout);
        assert!(
            t0.elapsed() < Duration::from_millis(600),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn unwrap_fails_over_to_the_next_key() {
        let s = setup(2);
        let r = ring(
            &s,
            &[&s.ids[0], &s.ids[1]],
            CacheConfig {
                max_entries: 0,
                ..Default::default()
            },
        );
        let (dek, wrapped) = r.generate(&ctx("f")).unwrap();
        // Key 0's envelope is damaged: the keyring still opens the file through key 1.
        let mut broken = wrapped[0].clone();
        broken.blob[40] ^= 1;
        let got = r.unwrap(&[&broken, &wrapped[1]], &ctx("f")).unwrap();
        assert_eq!(got.expose(), dek.expose());
    }

    #[test]
    fn cache_saves_decrypt_calls() {
        let s = setup(1);
        // Written by one process, read by another (with a cold cache).
        let writer = ring(&s, &[&s.ids[0]], CacheConfig::default());
        let (_, wrapped) = writer.generate(&ctx("f")).unwrap();
        let r = ring(&s, &[&s.ids[0]], CacheConfig::default());
        for _ in 0..5 {
            r.unwrap(&[&wrapped[0]], &ctx("f")).unwrap();
        }
        assert_eq!(r.op_stats(KmsOp::Decrypt).requests, 1);
        assert_eq!(r.cache_stats().hits, 4);
        // A different context is a different cache entry, and fails at the provider.
        assert_eq!(
            r.unwrap(&[&wrapped[0]], &ctx("g")).unwrap_err().kind,
            KeyErrorKind::ContextMismatch
        );
    }

    #[test]
    fn a_generated_key_is_cached_for_the_first_read() {
        let s = setup(1);
        let r = ring(&s, &[&s.ids[0]], CacheConfig::default());
        let (dek, wrapped) = r.generate(&ctx("f")).unwrap();
        assert_eq!(
            r.unwrap(&[&wrapped[0]], &ctx("f")).unwrap().expose(),
            dek.expose()
        );
        assert_eq!(r.op_stats(KmsOp::Decrypt).requests, 0);
        assert_eq!(r.cache_stats().hits, 1);
    }

    #[test]
    fn rewrap_within_a_provider_uses_re_encrypt() {
        let s = setup(2);
        let r = ring(&s, &[&s.ids[0], &s.ids[1]], CacheConfig::default());
        let (dek, wrapped) = r.generate(&ctx("a")).unwrap();
        let moved = r
            .rewrap(&wrapped[0], &ctx("a"), &s.ids[1], &ctx("b"))
            .unwrap();
        assert_eq!(s.faulty.calls(KmsOp::ReEncrypt), 1);
        assert_eq!(
            r.unwrap(&[&moved], &ctx("b")).unwrap().expose(),
            dek.expose()
        );
    }

    #[test]
    fn concurrency_is_bounded() {
        let s = setup(1);
        let keys = vec![TrustedProvider {
            key_id: s.ids[0].clone(),
            provider: s.faulty.clone(),
        }];
        let r = Arc::new(
            Keyring::new(
                keys,
                CacheConfig {
                    max_entries: 0,
                    ..Default::default()
                },
                fast_retry(),
                2,
            )
            .unwrap(),
        );
        s.faulty.set(
            None,
            Faults {
                latency: Duration::from_millis(50),
                ..Default::default()
            },
        );
        let t0 = Instant::now();
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let r = r.clone();
                std::thread::spawn(move || r.generate(&ctx(&format!("f{i}"))).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 6 calls of 50 ms, 2 at a time: at least 3 rounds.
        assert!(
            t0.elapsed() >= Duration::from_millis(145),
            "{:?}",
            t0.elapsed()
        );
    }
}

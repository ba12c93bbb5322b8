//! The AWS KMS provider against a real KMS-compatible server (moto, through aws-sdk-kms over
//! HTTP on loopback), and against a stand-in endpoint for what moto cannot model (throttling,
//! server errors, hangs, disabled keys).
//!
//! moto binds the encryption context by concatenating sorted keys and values without
//! separators; every mismatch here changes that concatenation (another path or volume id).
// Tests play the attacker and the operator: they touch the store by path on purpose.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::moto::{aws_test_env, free_port, MotoServer};
use common::stand_in::{Answer, StandIn};
use kmsfs::core::file::write_new_file;
use kmsfs::core::volume::{InitOptions, KeyOptions, OpenOptions};
use kmsfs::core::{EncryptedFile, Volume};
use kmsfs::error::Error;
use kmsfs::format::context::{CanonicalPath, EncryptionContext};
use kmsfs::keys::aws::{AwsKmsProvider, AwsOptions};
use kmsfs::keys::cache::CacheConfig;
use kmsfs::keys::fault::{Faults, FaultyProvider};
use kmsfs::keys::keyring::{Keyring, RetryPolicy, TrustedProvider};
use kmsfs::keys::spec::KeySpec;
use kmsfs::keys::{KeyErrorKind, KeyProvider, KmsOp};

const EAST: &str = "us-east-1";
const WEST: &str = "eu-west-1";

fn path(p: &str) -> CanonicalPath {
    CanonicalPath::from_user(Path::new(p)).unwrap()
}

fn ctx(p: &str, volume: u8) -> EncryptionContext {
    EncryptionContext::for_file(&[volume; 16], &path(p), &BTreeMap::new())
}

fn aws_options(endpoints: &[(&str, &str)]) -> AwsOptions {
    AwsOptions {
        attempt_timeout: Duration::from_secs(3),
        endpoints: endpoints
            .iter()
            .map(|(r, u)| (r.to_string(), u.to_string()))
            .collect(),
    }
}

fn provider(endpoints: &[(&str, &str)]) -> Arc<AwsKmsProvider> {
    aws_test_env();
    Arc::new(AwsKmsProvider::new(aws_options(endpoints)).unwrap())
}

fn key_options(endpoints: &[(&str, &str)]) -> KeyOptions {
    aws_test_env();
    KeyOptions {
        aws: aws_options(endpoints),
        ..Default::default()
    }
}

fn open(dir: &Path, key_options: KeyOptions) -> Result<Volume, Error> {
    Volume::open(
        dir,
        &OpenOptions {
            pin: vec![],
            key_options,
            ..Default::default()
        },
    )
}

fn keyring(p: &Arc<AwsKmsProvider>, keys: &[&str]) -> Keyring {
    let trusted = keys
        .iter()
        .map(|k| TrustedProvider {
            key_id: k.to_string(),
            provider: p.clone() as Arc<dyn KeyProvider>,
        })
        .collect();
    Keyring::new(trusted, CacheConfig::default(), RetryPolicy::default(), 8).unwrap()
}

#[test]
fn round_trip_through_the_sdk() {
    let moto = MotoServer::start();
    let arn = moto.create_key(EAST);
    let p = provider(&[(EAST, &moto.endpoint)]);
    let (dek, wrapped) = p.generate_data_key(&arn, &ctx("/a", 1)).unwrap();
    assert_eq!(wrapped.key_id, arn);
    assert_eq!(
        p.decrypt(&wrapped, &ctx("/a", 1)).unwrap().expose(),
        dek.expose()
    );
    let again = p.encrypt(&arn, &dek, &ctx("/b", 1)).unwrap();
    assert_eq!(
        p.decrypt(&again, &ctx("/b", 1)).unwrap().expose(),
        dek.expose()
    );
}

#[test]
fn context_mismatch_is_reported_as_such() {
    let moto = MotoServer::start();
    let arn = moto.create_key(EAST);
    let p = provider(&[(EAST, &moto.endpoint)]);
    let (_, wrapped) = p.generate_data_key(&arn, &ctx("/a", 1)).unwrap();
    for wrong in [ctx("/b", 1), ctx("/a", 2), ctx("/a/b", 1)] {
        let err = p.decrypt(&wrapped, &wrong).unwrap_err();
        assert_eq!(err.kind, KeyErrorKind::ContextMismatch, "{err}");
        assert_eq!(err.op, KmsOp::Decrypt);
    }
}

#[test]
fn decrypt_names_its_key_and_another_key_is_refused() {
    let moto = MotoServer::start();
    let (a, b) = (moto.create_key(EAST), moto.create_key(EAST));
    let p = provider(&[(EAST, &moto.endpoint)]);
    let (_, mut wrapped) = p.generate_data_key(&a, &ctx("/f", 1)).unwrap();
    // Relabelled to another key the caller can use: KMS itself refuses (moto answers
    // AccessDenied where AWS answers IncorrectKeyException).
    wrapped.key_id = b.clone();
    let err = p.decrypt(&wrapped, &ctx("/f", 1)).unwrap_err();
    assert!(
        matches!(
            err.kind,
            KeyErrorKind::AccessDenied | KeyErrorKind::IncorrectKey
        ),
        "{err}"
    );
    // Relabelled to a key the volume does not trust: refused before any request.
    let ring = keyring(&p, &[&a]);
    wrapped.key_id = b;
    let err = ring.unwrap(&[&wrapped], &ctx("/f", 1)).unwrap_err();
    assert_eq!(err.kind, KeyErrorKind::UntrustedKey);
    assert_eq!(ring.op_stats(KmsOp::Decrypt).requests, 0);
}

#[test]
fn re_encrypt_moves_a_key_to_a_second_key_and_path() {
    let moto = MotoServer::start();
    let (a, b) = (moto.create_key(EAST), moto.create_key(EAST));
    let p = provider(&[(EAST, &moto.endpoint)]);
    let ring = keyring(&p, &[&a, &b]);
    let (dek, wrapped) = ring.generate(&ctx("/old", 1)).unwrap();
    assert_eq!(wrapped.len(), 2, "one envelope per trusted key");
    let moved = ring
        .rewrap(&wrapped[0], &ctx("/old", 1), &b, &ctx("/new", 1))
        .unwrap();
    assert_eq!(moved.key_id, b);
    assert_eq!(
        ring.op_stats(KmsOp::ReEncrypt).requests,
        1,
        "one ReEncrypt, no Decrypt"
    );
    assert_eq!(ring.op_stats(KmsOp::Decrypt).requests, 0);
    assert_eq!(
        p.decrypt(&moved, &ctx("/new", 1)).unwrap().expose(),
        dek.expose()
    );
    assert!(p.decrypt(&moved, &ctx("/old", 1)).is_err());
}

#[test]
fn volume_on_kms_counts_its_calls() {
    let moto = MotoServer::start();
    let arn = moto.create_key(EAST);
    moto.create_alias(EAST, "alias/kmsfs-test", &arn);
    let dir = tempfile::tempdir().unwrap();
    let options = key_options(&[(EAST, &moto.endpoint)]);
    let init = Volume::init(
        dir.path(),
        InitOptions {
            keys: vec![KeySpec::Kms("alias/kmsfs-test".into())],
            key_options: options.clone(),
            plaintext_names: common::plaintext_names(),
            ..Default::default()
        },
    )
    .unwrap();
    let trusted = &init.volume.config().trusted_keys[0];
    assert_eq!(
        (trusted.id.as_str(), trusted.locator.as_str()),
        (arn.as_str(), "alias/kmsfs-test")
    );
    // Creating a file: one GenerateDataKey.
    let vol = init.volume;
    write_new_file(
        &vol,
        &vol.prepare_entry(&path("f")).unwrap(),
        &mut &b"kms data"[..],
    )
    .unwrap();
    assert_eq!(
        vol.keyring().op_stats(KmsOp::GenerateDataKey).requests,
        2,
        "volume key + file key"
    );

    // Opening the volume: one Decrypt (the volume key); a cold open: one more; warm: none.
    let pinned = OpenOptions {
        pin: vec![KeySpec::Kms("alias/kmsfs-test".into())],
        key_options: options.clone(),
        ..Default::default()
    };
    let vol = Volume::open(dir.path(), &pinned).unwrap();
    assert_eq!(vol.keyring().op_stats(KmsOp::Decrypt).requests, 1);
    let f = EncryptedFile::open(&vol, &common::stored(&vol, "f"), false).unwrap();
    assert_eq!(f.read_all().unwrap(), b"kms data");
    assert_eq!(vol.keyring().op_stats(KmsOp::Decrypt).requests, 2);
    EncryptedFile::open(&vol, &common::stored(&vol, "f"), false).unwrap();
    assert_eq!(vol.keyring().op_stats(KmsOp::Decrypt).requests, 2);
    assert_eq!(vol.keyring().cache_stats().hits, 1);

    // Pinning another key is refused, after resolving it.
    let other = moto.create_key(EAST);
    let wrong = OpenOptions {
        pin: vec![KeySpec::Kms(other)],
        key_options: options,
        ..Default::default()
    };
    let err = Volume::open(dir.path(), &wrong).unwrap_err();
    assert!(matches!(err, Error::KeyPin(_)), "{err}");
}

#[test]
fn disabled_key_is_refused_at_init() {
    let moto = MotoServer::start();
    let arn = moto.create_key(EAST);
    moto.disable_key(EAST, &arn);
    let dir = tempfile::tempdir().unwrap();
    let err = Volume::init(
        dir.path(),
        InitOptions {
            keys: vec![KeySpec::Kms(arn)],
            key_options: key_options(&[(EAST, &moto.endpoint)]),
            plaintext_names: common::plaintext_names(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("key disabled"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// A two-region volume (a key in each region, each region on its own endpoint) reads through
/// either key while the other region's endpoint is down.
#[test]
fn two_region_volume_reads_through_either_key() {
    let east = MotoServer::start();
    let west = MotoServer::start();
    let (a, b) = (east.create_key(EAST), west.create_key(WEST));
    let dir = tempfile::tempdir().unwrap();
    let both = key_options(&[(EAST, &east.endpoint), (WEST, &west.endpoint)]);
    let init = Volume::init(
        dir.path(),
        InitOptions {
            keys: vec![KeySpec::Kms(a.clone()), KeySpec::Kms(b.clone())],
            key_options: both,
            plaintext_names: common::plaintext_names(),
            ..Default::default()
        },
    )
    .unwrap();
    write_new_file(
        &init.volume,
        &init.volume.prepare_entry(&path("f")).unwrap(),
        &mut &b"replicated"[..],
    )
    .unwrap();
    let envelopes = EncryptedFile::open(&init.volume, &common::stored(&init.volume, "f"), false)
        .unwrap()
        .envelopes()
        .to_vec();
    assert_eq!(
        envelopes
            .iter()
            .map(|e| e.key.key_id.as_str())
            .collect::<Vec<_>>(),
        [a.as_str(), b.as_str()]
    );

    let dead = format!("http://127.0.0.1:{}", free_port());
    for (down, up, up_endpoint) in [(EAST, WEST, &west.endpoint), (WEST, EAST, &east.endpoint)] {
        let options = key_options(&[(down, &dead), (up, up_endpoint)]);
        let t0 = Instant::now();
        let vol = open(dir.path(), options).unwrap();
        let data = EncryptedFile::open(&vol, &common::stored(&vol, "f"), false)
            .unwrap()
            .read_all()
            .unwrap();
        assert_eq!(data, b"replicated", "{down} down");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "failover took {:?}",
            t0.elapsed()
        );
        // The preferred (east) key is always tried first; its failure costs one attempt per
        // unwrap, not a round of retries.
        let failed = vol.keyring().op_stats(KmsOp::Decrypt).failures;
        assert_eq!(failed, if down == EAST { 2 } else { 0 }, "{down} down");
    }
}

#[test]
fn failed_key_generation_changes_nothing_on_disk() {
    let moto = MotoServer::start();
    let arn = moto.create_key(EAST);
    let dir = tempfile::tempdir().unwrap();
    let options = key_options(&[(EAST, &moto.endpoint)]);
    Volume::init(
        dir.path(),
        InitOptions {
            keys: vec![KeySpec::Kms(arn)],
            key_options: options.clone(),
            plaintext_names: common::plaintext_names(),
            ..Default::default()
        },
    )
    .unwrap();
    let faulty: Arc<std::sync::Mutex<Option<Arc<FaultyProvider>>>> = Default::default();
    let slot = faulty.clone();
    let options = KeyOptions {
        retry: RetryPolicy {
            base_delay: Duration::from_millis(5),
            ..Default::default()
        },
        wrap_provider: Some(Arc::new(move |inner: Arc<dyn KeyProvider>| {
            let f = Arc::new(FaultyProvider::new(inner, 1));
            f.set(
                Some(KmsOp::GenerateDataKey),
                Faults {
                    throttle_per_mille: 1000,
                    ..Default::default()
                },
            );
            *slot.lock().unwrap() = Some(f.clone());
            f as Arc<dyn KeyProvider>
        })),
        ..options
    };
    let vol = open(dir.path(), options).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let err = write_new_file(
        &vol,
        &vol.prepare_entry(&path("f")).unwrap(),
        &mut &b"data"[..],
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Key { source, .. } if source.kind == KeyErrorKind::Throttled),
        "{err}"
    );
    assert!(err.to_string().contains("after 6 attempts"), "{err}");
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "no file, no temporary file");
    let f = faulty.lock().unwrap().clone().unwrap();
    assert_eq!(f.calls(KmsOp::GenerateDataKey), 6);
}

fn stand_in_ring(
    answer: Answer,
    attempt_timeout: Duration,
    retry: RetryPolicy,
) -> (StandIn, Keyring) {
    aws_test_env();
    let stand_in = StandIn::start(answer);
    let opts = AwsOptions {
        attempt_timeout,
        endpoints: [(EAST.to_string(), stand_in.endpoint.clone())].into(),
    };
    let p: Arc<dyn KeyProvider> = Arc::new(AwsKmsProvider::new(opts).unwrap());
    let key = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555";
    let ring = Keyring::new(
        vec![TrustedProvider {
            key_id: key.into(),
            provider: p,
        }],
        CacheConfig::default(),
        retry,
        4,
    )
    .unwrap();
    (stand_in, ring)
}

#[test]
fn throttling_is_retried_with_backoff_then_reported() {
    let retry = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(40),
        max_delay: Duration::from_millis(400),
        deadline: Duration::from_secs(10),
    };
    let (stand_in, ring) = stand_in_ring(
        Answer::Error {
            status: 400,
            error_type: "ThrottlingException",
        },
        Duration::from_secs(2),
        retry,
    );
    let t0 = Instant::now();
    let err = ring.generate(&ctx("/f", 1)).unwrap_err();
    assert_eq!(err.kind, KeyErrorKind::Throttled, "{err}");
    assert!(err.to_string().contains("after 5 attempts"), "{err}");
    assert_eq!(
        stand_in.requests(),
        5,
        "SDK retries are off: the keyring's are the only ones"
    );
    let stats = ring.op_stats(KmsOp::GenerateDataKey);
    assert_eq!((stats.requests, stats.retries), (5, 4));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[test]
fn server_errors_are_retried_and_client_errors_are_not() {
    let (stand_in, ring) = stand_in_ring(
        Answer::Error {
            status: 500,
            error_type: "KMSInternalException",
        },
        Duration::from_secs(2),
        RetryPolicy {
            base_delay: Duration::from_millis(5),
            max_attempts: 3,
            ..Default::default()
        },
    );
    let err = ring.generate(&ctx("/f", 1)).unwrap_err();
    assert_eq!(err.kind, KeyErrorKind::Unavailable, "{err}");
    assert_eq!(stand_in.requests(), 3);

    for (error_type, kind) in [
        ("AccessDeniedException", KeyErrorKind::AccessDenied),
        ("DisabledException", KeyErrorKind::KeyDisabled),
        ("NotFoundException", KeyErrorKind::NotFound),
        ("IncorrectKeyException", KeyErrorKind::IncorrectKey),
        ("InvalidCiphertextException", KeyErrorKind::ContextMismatch),
    ] {
        let (stand_in, ring) = stand_in_ring(
            Answer::Error {
                status: 400,
                error_type,
            },
            Duration::from_secs(2),
            RetryPolicy::default(),
        );
        let err = ring.generate(&ctx("/f", 1)).unwrap_err();
        assert_eq!(err.kind, kind, "{error_type}: {err}");
        assert_eq!(stand_in.requests(), 1, "{error_type} is not retried");
        if kind == KeyErrorKind::AccessDenied {
            let msg = err.to_string();
            assert!(
                msg.contains("GenerateDataKey") && msg.contains("key/1111"),
                "{msg}"
            );
            assert!(
                msg.contains("context keys: kmsfs:path, kmsfs:volume"),
                "{msg}"
            );
        }
    }
}

#[test]
fn a_hanging_endpoint_times_out_within_the_deadline() {
    let (stand_in, ring) = stand_in_ring(
        Answer::Hang,
        Duration::from_millis(300),
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            deadline: Duration::from_millis(1500),
        },
    );
    let t0 = Instant::now();
    let err = ring.generate(&ctx("/f", 1)).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(err.kind, KeyErrorKind::Timeout, "{err}");
    assert!(took < Duration::from_millis(2500), "gave up after {took:?}");
    assert!(
        stand_in.requests() >= 2,
        "retried: {} requests",
        stand_in.requests()
    );
}

/// The whole command-line path on a KMS key named by ARN, through the standard endpoint
/// override: init, import, cat, info, and a pin that does not match.
#[test]
fn cli_init_import_cat_with_a_kms_key_arn() {
    let moto = MotoServer::start();
    let (arn, other) = (moto.create_key(EAST), moto.create_key(EAST));
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing");
    std::fs::create_dir(&backing).unwrap();
    let b = backing.display().to_string();
    let run_with_log = |args: &[&str], stdin: &[u8], log: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kmsfs"))
            .args(args)
            .env("RUST_LOG", log)
            .env("AWS_ENDPOINT_URL_KMS", &moto.endpoint)
            .env("AWS_REGION", EAST)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("KMSFS_STATE_DIR", common::state_dir())
            .env_remove("KMSFS_KMS_ENDPOINTS")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    };
    let run = |args: &[&str], stdin: &[u8]| run_with_log(args, stdin, "warn");
    let init = [
        "init",
        &b,
        "--key",
        &arn,
        "--context",
        "tenant_id=clinic-42",
    ];
    let out = run(&[&init[..], common::names_args()].concat(), b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("trusted key: {arn}")));
    assert!(
        !dir.path().join("config").exists(),
        "no local key file for a KMS volume"
    );
    let data = b"regulated record\n".repeat(500);
    assert!(run(&["import", &b, "record.txt"], &data).status.success());
    let out = run(&["cat", &b, "record.txt", "--key", &arn], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, data);
    // info names the user's path, also where the key is bound; the store and the key
    // service see the stored path (with encrypted names, not the plaintext name).
    let out = run(&["info", &b, "record.txt"], b"");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("path:        /record.txt\n")
            && text.contains(&format!("key {arn} bound to /record.txt\n")),
        "{text}"
    );
    let stored = match text.lines().find_map(|l| l.strip_prefix("stored as:   ")) {
        Some(s) => s.to_string(),
        None => {
            assert!(common::plaintext_names(), "{text}");
            "/record.txt".to_string()
        }
    };
    // Even at trace level, the logs carry no key material: kmsfs logs each call's operation,
    // key, context and latency, and the SDK redacts plaintext (no raw KMS bodies).
    let out = run_with_log(&["cat", &b, "record.txt"], b"", "trace");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("kms call") && log.contains(&format!("kmsfs:path={stored}")),
        "{log}"
    );
    // What CloudTrail would show: the context names no plaintext name.
    assert_eq!(
        log.contains("kmsfs:path=/record.txt"),
        common::plaintext_names(),
        "{log}"
    );
    assert!(
        !log.contains("\"Plaintext\"") && !log.contains("\"CiphertextBlob\""),
        "{log}"
    );
    let out = run(&["cat", &b, "record.txt", "--key", &other], b"");
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is not protected by the key"), "{stderr}");
}

#[test]
fn rewrap_moves_every_file_from_one_kms_key_to_another_with_re_encrypt_only() {
    use kmsfs::core::rewrap::{rewrap_files, still_under};
    let moto = MotoServer::start();
    let (old, new) = (moto.create_key(EAST), moto.create_key(EAST));
    moto.create_alias(EAST, "alias/kmsfs-next", &new);
    let dir = tempfile::tempdir().unwrap();
    let options = key_options(&[(EAST, &moto.endpoint)]);
    let init = Volume::init(
        dir.path(),
        InitOptions {
            keys: vec![KeySpec::Kms(old.clone())],
            key_options: options.clone(),
            plaintext_names: common::plaintext_names(),
            ..Default::default()
        },
    )
    .unwrap();
    let n = 60;
    for i in 0..n {
        let at = init.volume.prepare_entry(&path(&format!("f{i}"))).unwrap();
        write_new_file(&init.volume, &at, &mut &[i as u8; 100][..]).unwrap();
    }
    drop(init);
    let mut vol = open(dir.path(), options.clone()).unwrap();
    let (id, added) = vol
        .add_trusted_key(&KeySpec::Kms("alias/kmsfs-next".into()))
        .unwrap();
    assert_eq!((id.as_str(), added), (new.as_str(), true));
    let files = vol.files_beneath(&CanonicalPath::root()).unwrap();
    let summary = rewrap_files(
        &vol,
        &files,
        std::slice::from_ref(&old),
        &new,
        4,
        false,
        &|_| {},
    );
    assert!(summary.failures.is_empty(), "{:?}", summary.failures);
    assert_eq!((summary.rewrapped, summary.envelopes), (n, n));
    let ring = vol.keyring();
    assert_eq!(
        ring.op_stats(KmsOp::ReEncrypt).requests,
        n as u64 + 1,
        "files + volume key"
    );
    assert_eq!(
        ring.op_stats(KmsOp::Decrypt).requests,
        1,
        "only the volume key, at open"
    );
    assert_eq!(ring.op_stats(KmsOp::Encrypt).requests, 0);
    assert!(still_under(&vol, &files, std::slice::from_ref(&old)).is_empty());
    vol.retire_keys(std::slice::from_ref(&old)).unwrap();
    // Opened afresh, the volume trusts only the new key and every file reads through it.
    let vol = open(dir.path(), options).unwrap();
    assert_eq!(vol.keyring().key_ids(), vec![new.clone()]);
    for i in 0..n {
        let at = common::stored(&vol, &format!("f{i}"));
        let f = EncryptedFile::open(&vol, &at, false).unwrap();
        assert_eq!(f.read_all().unwrap(), vec![i as u8; 100]);
    }
}

/// A KMS pin is matched against the key's ARN as KMS resolves it, never against a locator the
/// config (whoever writes the store) wrote: a forged config naming the attacker's key by the
/// locator string `alias/victim` does not satisfy `--key alias/victim`.
#[test]
fn a_kms_pin_matches_the_resolved_arn_never_a_locator_in_the_config() {
    let moto = MotoServer::start();
    let (attacker, victim) = (moto.create_key(EAST), moto.create_key(EAST));
    let options = key_options(&[(EAST, &moto.endpoint)]);
    let init = |dir: &Path| {
        Volume::init(
            dir,
            InitOptions {
                keys: vec![KeySpec::Kms("alias/victim".into())],
                key_options: options.clone(),
                plaintext_names: common::plaintext_names(),
                ..Default::default()
            },
        )
        .unwrap()
        .volume
    };
    // The attacker's volume, made while the alias named their key: its config says
    // id = the attacker's ARN, locator = "alias/victim".
    moto.create_alias(EAST, "alias/victim", &attacker);
    let rogue = tempfile::tempdir().unwrap();
    let t = init(rogue.path()).config().trusted_keys[0].clone();
    assert_eq!(
        (t.id.as_str(), t.locator.as_str()),
        (attacker.as_str(), "alias/victim")
    );
    moto.update_alias(EAST, "alias/victim", &victim);
    let genuine = tempfile::tempdir().unwrap();
    let vol = init(genuine.path());
    assert_eq!(vol.config().trusted_keys[0].id, victim);
    write_new_file(
        &vol,
        &vol.prepare_entry(&path("f")).unwrap(),
        &mut &b"victim data"[..],
    )
    .unwrap();
    let pinned = OpenOptions {
        pin: vec![KeySpec::Kms("alias/victim".into())],
        key_options: options.clone(),
        ..Default::default()
    };
    // Positive control: the genuine config opens under the pin.
    Volume::open(genuine.path(), &pinned).unwrap();
    // The forged one does not, though its locator is the pin's very string.
    std::fs::copy(
        rogue.path().join(".kmsfs/config"),
        genuine.path().join(".kmsfs/config"),
    )
    .unwrap();
    let err = Volume::open(genuine.path(), &pinned).unwrap_err();
    assert!(matches!(err, Error::KeyPin(_)), "{err}");
    assert!(
        err.to_string().contains(&victim),
        "names the resolved ARN: {err}"
    );
}

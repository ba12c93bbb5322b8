//! A real KMS-compatible server for tests: moto's `moto_server` on a free loopback port,
//! killed (by pid) when dropped, even if the test fails. Keys are created through the KMS API
//! with aws-sdk-kms, as an operator would.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use aws_sdk_kms::config::{BehaviorVersion, Region};

pub struct MotoServer {
    child: Child,
    pub port: u16,
    pub endpoint: String,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Credentials and settings that keep the AWS SDK on this machine: dummy static keys (moto
/// accepts any), no instance-metadata probe, no profile.
pub fn aws_test_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::remove_var("AWS_PROFILE");
        // Anything not given its own endpoint goes nowhere.
        std::env::set_var("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9");
    });
}

impl MotoServer {
    pub fn start() -> Self {
        aws_test_env();
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}); install it with: pip install 'moto[server]' (scripts/test.sh does)")
            });
        let server = MotoServer {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn client(&self, region: &str) -> (tokio::runtime::Runtime, aws_sdk_kms::Client) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conf = rt.block_on(
            aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(region.to_string()))
                .endpoint_url(&self.endpoint)
                .load(),
        );
        (rt, aws_sdk_kms::Client::new(&conf))
    }

    /// A new symmetric key in `region`; returns its ARN.
    pub fn create_key(&self, region: &str) -> String {
        let (rt, client) = self.client(region);
        let out = rt.block_on(client.create_key().send()).unwrap();
        out.key_metadata().unwrap().arn().unwrap().to_string()
    }

    pub fn create_alias(&self, region: &str, alias: &str, key_arn: &str) {
        let (rt, client) = self.client(region);
        rt.block_on(
            client
                .create_alias()
                .alias_name(alias)
                .target_key_id(key_arn)
                .send(),
        )
        .unwrap();
    }

    /// Points an existing alias at another key.
    pub fn update_alias(&self, region: &str, alias: &str, key_arn: &str) {
        let (rt, client) = self.client(region);
        rt.block_on(
            client
                .update_alias()
                .alias_name(alias)
                .target_key_id(key_arn)
                .send(),
        )
        .unwrap();
    }

    pub fn disable_key(&self, region: &str, key_arn: &str) {
        let (rt, client) = self.client(region);
        // moto's DisableKey wants the bare key id, not the ARN.
        let id = key_arn.rsplit('/').next().unwrap();
        rt.block_on(client.disable_key().key_id(id).send()).unwrap();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Parsing the KEY argument of `--key` / `--to-key`.

use std::path::PathBuf;

/// A key as the user names it on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// `local:PATH`: a 32-byte master key file.
    Local(PathBuf),
    /// An AWS KMS key id, ARN, alias (`alias/x`) or multi-region key id.
    Kms(String),
}

impl KeySpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("local:") {
            if path.is_empty() {
                return Err(
                    "'local:' needs a key file path, e.g. local:/root/.config/kmsfs/keys/vol.key"
                        .into(),
                );
            }
            return Ok(KeySpec::Local(PathBuf::from(path)));
        }
        let looks_like_kms = s.starts_with("arn:aws")
            || s.starts_with("alias/")
            || s.starts_with("mrk-")
            || is_key_uuid(s);
        if looks_like_kms {
            Ok(KeySpec::Kms(s.to_string()))
        } else {
            Err(format!(
                "unrecognized key '{s}': use local:PATH, a KMS key id, a key ARN or alias/NAME"
            ))
        }
    }

    /// The form recorded as a trusted key's locator in the volume config.
    pub fn locator(&self) -> String {
        match self {
            KeySpec::Local(p) => format!("local:{}", p.display()),
            KeySpec::Kms(id) => id.clone(),
        }
    }
}

fn is_key_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(
            KeySpec::parse("local:/k").unwrap(),
            KeySpec::Local("/k".into())
        );
        for kms in [
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "alias/kmsfs",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
        ] {
            assert_eq!(KeySpec::parse(kms).unwrap(), KeySpec::Kms(kms.into()));
        }
        for bad in ["", "local:", "mykey", "/path/to/key"] {
            assert!(KeySpec::parse(bad).is_err(), "{bad}");
        }
    }
}

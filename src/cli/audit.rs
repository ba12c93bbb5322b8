//! `kmsfs audit`: CloudTrail's KMS events of a volume, with the plaintext paths they were for.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use clap::Args;

use super::{printable, VolumeArgs};
use crate::core::audit::{AuditEvent, Auditor, Named};
use crate::error::{Error, Result};

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// CloudTrail events: a log file ({"Records":[...]}, gzip-compressed or not) or one JSON
    /// event a line; standard input if absent or '-'
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Print one JSON object per event and line on standard output
    #[arg(long)]
    pub json: bool,
}

#[allow(clippy::disallowed_methods)] // FILE is the user's log file, not the store's
pub fn run(args: AuditArgs) -> Result<()> {
    let input: Box<dyn Read> = match &args.file {
        Some(f) if f.as_os_str() != "-" => Box::new(
            std::fs::File::open(f)
                .map_err(|e| Error::io(format!("cannot open {}", f.display()), e))?,
        ),
        _ if std::io::stdin().is_terminal() => {
            return Err(Error::Usage(
                "no FILE, and standard input is a terminal: give a CloudTrail log file, or \
                 pipe its events in"
                    .into(),
            ))
        }
        _ => Box::new(std::io::stdin().lock()),
    };
    let volume = args.volume.open()?;
    let mut out = std::io::stdout().lock();
    let summary = Auditor::new(&volume).read(input, |event| {
        let line = if args.json { json(event) } else { text(event) };
        writeln!(out, "{line}").map_err(|e| Error::io("cannot write to standard output", e))
    })?;
    out.flush()
        .map_err(|e| Error::io("cannot write to standard output", e))?;
    eprintln!(
        "{} events for this volume, {} skipped, {} not decoded",
        summary.events, summary.skipped, summary.undecoded
    );
    Ok(())
}

/// `TIME PRINCIPAL OPERATION PATH SOURCE_IP`, a failed call's operation marked
/// `(failed:CODE)`, ReEncrypt's path `FROM -> TO`; `-` for a field the event lacks.
pub fn text(e: &AuditEvent) -> String {
    let field = |s: &Option<String>| s.as_deref().map_or_else(|| "-".into(), printable);
    let mut operation = printable(&e.operation);
    if let Some(code) = &e.event_error {
        operation = format!("{operation}(failed:{})", printable(code));
    }
    let path = match &e.from {
        Some(from) => format!("{} -> {}", shown(from), shown(&e.target)),
        None => shown(&e.target),
    };
    format!(
        "{} {} {operation} {path} {}",
        field(&e.time),
        field(&e.principal),
        field(&e.source_ip)
    )
}

/// A plaintext path, or `?` and why there is none.
fn shown(n: &Named) -> String {
    match n.plain() {
        Some(p) => printable(p),
        None => format!("? ({})", printable(n.why().unwrap_or_default())),
    }
}

/// The event as one JSON object, its fields in this order (ReEncrypt's source context in the
/// `from_` fields, null for other calls).
pub fn json(e: &AuditEvent) -> String {
    let from = e.from.as_ref();
    let fields: [(&str, Option<&str>); 11] = [
        ("time", e.time.as_deref()),
        ("principal", e.principal.as_deref()),
        ("operation", Some(&e.operation)),
        ("path", e.target.plain()),
        ("stored_path", e.target.stored()),
        ("error", e.target.why()),
        ("from_path", from.and_then(Named::plain)),
        ("from_stored_path", from.and_then(Named::stored)),
        ("from_error", from.and_then(Named::why)),
        ("source_ip", e.source_ip.as_deref()),
        ("event_error", e.event_error.as_deref()),
    ];
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\":{}", serde_json::Value::from(*v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_per_event_whatever_its_fields_hold() {
        let event = AuditEvent {
            time: Some("2026-12-01T09:00:00Z".into()),
            principal: Some("arn:aws:iam::1:user/x\n2026-12-01T09:00:01Z forged".into()),
            operation: "ReEncrypt".into(),
            source_ip: None,
            event_error: Some("AccessDeniedException".into()),
            target: Named::Path {
                stored: "/s".into(),
                plain: "/evil\u{202e}xslx.exe".into(),
            },
            from: Some(Named::Undecoded {
                stored: "/t".into(),
                why: "gone".into(),
            }),
        };
        assert_eq!(
            text(&event),
            "2026-12-01T09:00:00Z arn:aws:iam::1:user/x\\u{a}2026-12-01T09:00:01Z forged \
             ReEncrypt(failed:AccessDeniedException) ? (gone) -> /evil\\u{202e}xslx.exe -"
        );
        let json: serde_json::Value = serde_json::from_str(&json(&event)).unwrap();
        assert_eq!(json["path"], "/evil\u{202e}xslx.exe");
        assert_eq!(json["from_path"], serde_json::Value::Null);
        assert_eq!(json["from_error"], "gone");
        assert_eq!(json["from_stored_path"], "/t");
        assert_eq!(json["source_ip"], serde_json::Value::Null);
        assert!(!json.to_string().contains('\n'));
    }
}

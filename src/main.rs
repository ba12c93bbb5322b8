use clap::Parser;
use kmsfs::cli::{run, Cli};
use kmsfs::error::EXIT_USAGE;

fn main() {
    // Die quietly on a closed pipe (`kmsfs info | head`), as command-line tools do.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error")),
        )
        .with_writer(kmsfs::log::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    // Run as mount.kmsfs (by mount(8) for `-t kmsfs` and fstab): translate its arguments.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = std::path::Path::new(&args[0])
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    if invoked_as == "mount.kmsfs" {
        match kmsfs::cli::mount_helper::translate(&args[1..]) {
            Ok(translated) => args = std::iter::once("kmsfs".into()).chain(translated).collect(),
            Err(e) => {
                eprintln!("mount.kmsfs: {e}");
                std::process::exit(e.exit_code());
            }
        }
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                std::process::exit(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        EXIT_USAGE
                    } else {
                        0
                    },
                );
            }
            // One line: clap's first sentence, without its usage block.
            let rendered = e.render().to_string();
            let head = rendered.split("\n\n").next().unwrap_or("invalid arguments");
            let head = head.strip_prefix("error: ").unwrap_or(head);
            let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("kmsfs: {line} (see 'kmsfs --help')");
            std::process::exit(EXIT_USAGE);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("kmsfs: {e}");
        std::process::exit(e.exit_code());
    }
}

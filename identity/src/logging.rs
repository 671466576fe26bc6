//! Logging setup shared by every Musubi binary: `MUSUBI_LOG` (tracing filter syntax) picks
//! what is logged, `MUSUBI_LOG_FORMAT=json` switches to JSON lines; always on stderr.

/// Installs the process-wide subscriber; `default` is the filter when `MUSUBI_LOG` is unset.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("MUSUBI_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

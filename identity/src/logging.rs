//! Process setup shared by every Musubi binary: logging (`MUSUBI_LOG` in tracing filter syntax,
//! `MUSUBI_LOG_FORMAT=json` for JSON lines, always on stderr) and the async runtime.

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

/// The multi-threaded runtime every control-plane binary runs on; a failure to create it ends
/// the process with a line naming `bin` (nothing can be served without it).
pub fn runtime_or_exit(bin: &str) -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{bin}: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    }
}

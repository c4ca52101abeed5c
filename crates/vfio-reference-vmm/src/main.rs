//! `vfio-reference-vmm`: see the crate README.

use std::process::ExitCode;

/// A minimal logger: `vmm: <level>: message` on stderr; `-v` shows debug messages.
struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("vmm: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

#[cfg(target_arch = "x86_64")]
fn main() -> ExitCode {
    use vfio_reference_vmm::args::{parse, USAGE};
    use vfio_reference_vmm::vmm::{Stop, Vmm};

    let started = std::time::Instant::now();
    let config = match parse(std::env::args().skip(1)) {
        Ok(Some(c)) => c,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(if config.verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    });
    let vmm = match Vmm::new(&config, started) {
        Ok(v) => v,
        Err(e) => {
            // The message carries its causes (each error's text includes its source's).
            eprintln!("vmm: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "vmm: guest starting ({} ms after start)",
        started.elapsed().as_millis()
    );
    let bus = vmm.bus().clone();
    let stop = vmm.run(started);
    log::debug!("exits: {}", bus.stats);
    let secs = started.elapsed().as_secs_f64();
    match stop {
        Stop::Exit(code) => {
            eprintln!("vmm: guest wrote {code} to the debug-exit port after {secs:.3} s");
            ExitCode::from(code)
        }
        Stop::Reset(why) => {
            eprintln!("vmm: guest reset after {secs:.3} s: {why}");
            ExitCode::SUCCESS
        }
        Stop::Failed(e) => {
            eprintln!("vmm: error after {secs:.3} s: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() -> ExitCode {
    let _ = &LOGGER;
    eprintln!("vfio-reference-vmm: x86_64 only");
    ExitCode::from(2)
}

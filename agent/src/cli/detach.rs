//! `bulkhead detach`: remove every program and pin from the kernel.

use std::process::ExitCode;

use super::args::DetachArgs;
use crate::{config::Config, control, kernel};

pub fn detach(args: &DetachArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = args.control_socket.clone().unwrap_or(config.control.socket);
    if let Err(e) = control::server::ensure_free(&socket) {
        eprintln!("bulkhead detach: refused: {e}; stop the agent first");
        return ExitCode::FAILURE;
    }
    let root = kernel::pins::PinRoot(args.pin_dir.clone().unwrap_or(config.pin_dir));
    let current = root.current();
    if !current.exists() {
        println!("nothing to detach: no pins at {}", current.display());
        return ExitCode::SUCCESS;
    }
    kernel::pins::remove_pins(&current);
    kernel::pins::clean_leftovers(&root);
    if current.exists() {
        eprintln!(
            "bulkhead detach: some pins under {} could not be removed",
            current.display()
        );
        return ExitCode::FAILURE;
    }
    println!("detached: every bulkhead program removed from the kernel; nothing is enforced now");
    ExitCode::SUCCESS
}

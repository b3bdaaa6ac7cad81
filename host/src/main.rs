use std::process::ExitCode;

fn main() -> ExitCode {
    earshot::cli::main()
}

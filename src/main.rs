fn main() -> std::process::ExitCode {
    hot_clone::cli::main()
}

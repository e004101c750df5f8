fn main() {
    std::process::exit(diskferry::cli::main());
}

fn main() {
    std::process::exit(meshsec::cli::main());
}

//! Writes the man pages and shell completions the Debian package ships,
//! generated from the command line itself (packaging/build-deb runs it):
//!
//!     gen_assets OUT_DIR
//!
//! OUT_DIR/man/meshsec.8 and one meshsec-SUBCOMMAND.8 per subcommand
//! (clap_mangen), OUT_DIR/completions/meshsec.bash, _meshsec (zsh) and
//! meshsec.fish (clap_complete).

use std::path::{Path, PathBuf};

use clap_complete::Shell;

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("gen_assets: usage: gen_assets OUT_DIR");
        std::process::exit(2);
    };
    if let Err(e) = generate(&out) {
        eprintln!("gen_assets: {}: {e}", out.display());
        std::process::exit(1);
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    let mut cmd = meshsec::cli::command()
        .propagate_version(true)
        .disable_help_subcommand(true);
    // Gives every subcommand its display name (meshsec-agent) and version.
    cmd.build();

    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    let page = |c: clap::Command| -> std::io::Result<()> {
        let m = clap_mangen::Man::new(c)
            .section("8")
            .source(concat!("meshsec ", env!("CARGO_PKG_VERSION")))
            .manual("System Administration");
        m.generate_to(&man)?;
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub.clone())?;
    }
    page(cmd.clone())?;

    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "meshsec", &completions)?;
    }
    Ok(())
}

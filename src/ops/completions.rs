//! `prism-sync completions SHELL` and `prism-sync man`: shell completions and man pages,
//! generated from the command line's own definition (clap_complete, clap_mangen), so that they
//! never disagree with the binary. The container image installs both.

use std::path::Path;

use anyhow::Context;
use clap::{Args, CommandFactory};

use crate::cli::Cli;

pub use clap_complete::Shell;

/// Writes the completion script for `shell`.
pub fn completions(shell: Shell, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    // clap_complete panics when its writer fails (a closed pipe, as in `| head`): it writes
    // into memory, and the error of the real write is returned.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "prism-sync", &mut script);
    out.write_all(&script)
}

/// Writes `prism-sync(1)` in roff: the synopsis, the global options and every verb.
pub fn man(out: &mut impl std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// Writes `prism-sync.1` and one `prism-sync-VERB.1` per verb into `dir`; returns the files.
pub fn man_pages(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)?;
    let mut pages: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("prism-sync") && n.ends_with(".1"))
        })
        .collect();
    pages.sort();
    Ok(pages)
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write prism-sync.1 and one prism-sync-VERB.1 per verb here instead of printing.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

/// `prism-sync man`: the page on stdout, or every page written into `--dir` (their paths listed).
pub fn run_man(args: &ManArgs, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    match &args.dir {
        Some(dir) => {
            let pages = man_pages(dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            for page in pages {
                writeln!(out, "{}", page.display())?;
            }
        }
        None => man(out)?,
    }
    Ok(())
}

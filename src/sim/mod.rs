//! The Prism API simulator (built in the `sim` worktree).

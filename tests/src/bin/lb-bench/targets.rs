//! The targets, checked against the figures of this run.

pub struct Check {
    pub target: &'static str,
    pub measured: String,
    pub met: bool,
}

/// A Markdown table of the checks.
pub fn table(checks: &[Check]) -> String {
    let mut out = String::from("| target | this run | met |\n|---|---|---|\n");
    for c in checks {
        out.push_str(&format!("| {} | {} | {} |\n", c.target, c.measured, if c.met { "yes" } else { "no" }));
    }
    out
}

//! `lb import nginx PATH`: an nginx configuration's upstreams as an
//! `lb.toml`. `syntax` reads the files (includes followed), `convert` maps
//! what has a layer-4 meaning and warns about the rest; this module writes
//! the result.
mod convert;
mod syntax;

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

pub use self::convert::{nginx_time, Options, Warning};
use crate::config::{Config, ServiceConfig};

/// The TOML text of the imported configuration, and the warnings (also in
/// the text, as comments).
pub fn import(path: &Path, options: &Options, interfaces: &[String]) -> Result<(String, Vec<Warning>)> {
    let tree = syntax::load(path)?;
    let imported = convert::convert(&tree, options);
    let text = render(path, &imported.services, &imported.warnings, interfaces)?;
    // What is printed must be what the agent takes.
    Config::parse(&text, Path::new("the imported configuration"))
        .context("the import produced a configuration lb refuses (a bug: please report it with the nginx file)")?;
    Ok((text, imported.warnings))
}

#[derive(Serialize)]
struct Services<'a> {
    service: &'a [ServiceConfig],
}

fn render(path: &Path, services: &[ServiceConfig], warnings: &[Warning], interfaces: &[String]) -> Result<String> {
    let mut out = format!("# Imported from {} by `lb import nginx` (lb {}).\n", path.display(), crate::VERSION);
    if warnings.is_empty() {
        out.push_str("# Everything in it has an lb equivalent.\n");
    } else {
        out.push_str(&format!("# {} things in it have no layer-4 equivalent or changed meaning:\n", warnings.len()));
        for w in warnings {
            out.push_str(&format!("#   {}: {}\n", w.at, w.text));
        }
    }
    out.push_str("\n[agent]\n");
    if interfaces.is_empty() {
        out.push_str("# The interfaces where clients arrive and backends answer, as in [\"eth0\"].\n");
    }
    out.push_str(&format!("interfaces = {}\n", toml::Value::from(interfaces.to_vec())));
    if services.is_empty() {
        out.push_str("\n# No upstream of this configuration is proxied to from a listen address lb can take.\n");
    } else {
        out.push('\n');
        out.push_str(&toml::to_string(&Services { service: services }).context("writing the services as TOML")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

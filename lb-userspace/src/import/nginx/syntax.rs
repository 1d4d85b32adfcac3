//! nginx's configuration syntax: directives with their arguments and
//! blocks, `include`s followed, each directive knowing its file and line.
//! It reads what nginx reads, nothing of what the directives mean.
use std::{
    fmt,
    path::{Path, PathBuf},
    rc::Rc,
};

use anyhow::{bail, Context, Result};

/// Where a directive was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    pub file: Rc<PathBuf>,
    pub line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    /// The directives between its braces, for a block directive.
    pub block: Option<Vec<Directive>>,
    pub at: Place,
}

impl Directive {
    /// The block's directives (none for a simple directive).
    pub fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or_default()
    }
}

/// Includes within includes, at most: deeper is a loop.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Reads the configuration at `path` and everything it includes. Relative
/// `include` paths are taken from the main file's folder, as nginx takes
/// them from its configuration prefix.
pub fn load(path: &Path) -> Result<Vec<Directive>> {
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    read_file(path, &base, 0)
}

fn read_file(path: &Path, base: &Path, depth: usize) -> Result<Vec<Directive>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = Rc::new(path.to_path_buf());
    let tokens = tokenize(&text, &file)?;
    let mut at = 0;
    let directives = parse_block(&tokens, &mut at, false, &file)?;
    expand_includes(directives, base, depth)
}

/// Replaces every `include` (at any depth) by the directives of the files it
/// names, in the sorted order nginx reads a pattern's matches in.
fn expand_includes(directives: Vec<Directive>, base: &Path, depth: usize) -> Result<Vec<Directive>> {
    let mut out = Vec::new();
    for mut d in directives {
        if d.name == "include" && d.block.is_none() {
            if depth >= MAX_INCLUDE_DEPTH {
                bail!("{}: includes nest deeper than {MAX_INCLUDE_DEPTH}: does a file include itself?", d.at);
            }
            let [pattern] = d.args.as_slice() else {
                bail!("{}: include takes one file or pattern", d.at);
            };
            let pattern = if Path::new(pattern).is_absolute() { PathBuf::from(pattern) } else { base.join(pattern) };
            let pattern = pattern.to_string_lossy().into_owned();
            let mut files: Vec<PathBuf> = glob::glob(&pattern)
                .with_context(|| format!("{}: include {pattern}: not a valid pattern", d.at))?
                .filter_map(|entry| entry.ok())
                .collect();
            files.sort();
            if files.is_empty() && !pattern.contains(['*', '?', '[']) {
                bail!("{}: include {pattern}: no such file", d.at);
            }
            for file in files {
                out.extend(read_file(&file, base, depth + 1).with_context(|| format!("included at {}", d.at))?);
            }
            continue;
        }
        if let Some(block) = d.block.take() {
            d.block = Some(expand_includes(block, base, depth)?);
        }
        out.push(d);
    }
    Ok(out)
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    End,
}

fn tokenize(text: &str, file: &Rc<PathBuf>) -> Result<Vec<(Token, usize)>> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                line += 1;
                chars.next();
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '{' | '}' | ';' => {
                chars.next();
                let t = match c {
                    '{' => Token::Open,
                    '}' => Token::Close,
                    _ => Token::End,
                };
                tokens.push((t, line));
            }
            '"' | '\'' => {
                let start = line;
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => bail!("{}:{start}: a quoted string is not closed", file.display()),
                        Some(q) if q == c => break,
                        Some('\\') => match chars.next() {
                            Some(e) if e == c || e == '\\' => word.push(e),
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                            None => bail!("{}:{start}: a quoted string is not closed", file.display()),
                        },
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            word.push(ch);
                        }
                    }
                }
                tokens.push((Token::Word(word), start));
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || ch == ';' || ch == '{' || ch == '}' {
                        // `${name}` is a variable inside a word, not a block.
                        if ch == '{' && word.ends_with('$') {
                            while let Some(v) = chars.next() {
                                word.push(v);
                                if v == '}' {
                                    break;
                                }
                            }
                            continue;
                        }
                        break;
                    }
                    word.push(ch);
                    chars.next();
                }
                tokens.push((Token::Word(word), line));
            }
        }
    }
    Ok(tokens)
}

fn parse_block(tokens: &[(Token, usize)], at: &mut usize, nested: bool, file: &Rc<PathBuf>) -> Result<Vec<Directive>> {
    let mut directives = Vec::new();
    let place = |line: usize| Place { file: file.clone(), line };
    loop {
        let Some((token, line)) = tokens.get(*at) else {
            if nested {
                bail!("{}: a block is not closed: '}}' is missing at the end", place(tokens.last().map_or(1, |t| t.1)));
            }
            return Ok(directives);
        };
        *at += 1;
        let name = match token {
            Token::Close if nested => return Ok(directives),
            Token::Close => bail!("{}: unexpected '}}'", place(*line)),
            Token::Open | Token::End => bail!("{}: expected a directive name", place(*line)),
            Token::Word(name) => name.clone(),
        };
        let mut args = Vec::new();
        loop {
            match tokens.get(*at) {
                None => bail!("{}: directive {name:?} has no ending ';'", place(*line)),
                Some((Token::Word(w), _)) => {
                    args.push(w.clone());
                    *at += 1;
                }
                Some((Token::End, _)) => {
                    *at += 1;
                    directives.push(Directive { name, args, block: None, at: place(*line) });
                    break;
                }
                Some((Token::Open, _)) => {
                    *at += 1;
                    let block = parse_block(tokens, at, true, file)?;
                    directives.push(Directive { name, args, block: Some(block), at: place(*line) });
                    break;
                }
                Some((Token::Close, l)) => bail!("{}: directive {name:?} has no ending ';'", place(*l)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-nginx-syntax-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn directives_blocks_quotes_comments_and_lines() {
        let dir = temp_dir("basic");
        let main = write(
            &dir,
            "nginx.conf",
            "# a comment\nworker_processes 4;\nhttp {\n  log_format main '$remote_addr \"x\"; {y}';\n\
             server { listen 80; location / { proxy_pass http://${up}; } }\n}\n",
        );
        let d = load(&main).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].name.as_str(), d[0].args.as_slice(), d[0].at.line), ("worker_processes", &["4".to_string()][..], 2));
        let http = d[1].children();
        assert_eq!(http[0].args, vec!["main".to_string(), "$remote_addr \"x\"; {y}".to_string()]);
        assert_eq!(http[1].name, "server");
        assert_eq!(http[1].at.line, 5);
        let location = &http[1].children()[1];
        assert_eq!(location.args, vec!["/".to_string()]);
        assert_eq!(location.children()[0].args, vec!["http://${up}".to_string()]);
    }

    #[test]
    fn includes_are_followed_with_globs_in_order_and_keep_their_own_places() {
        let dir = temp_dir("include");
        write(&dir, "conf.d/b.conf", "upstream b { server 198.19.0.12:80; }\n");
        write(&dir, "conf.d/a.conf", "\n\nupstream a { server 198.19.0.11:80; }\n");
        write(&dir, "conf.d/ignored.txt", "this is not nginx syntax {");
        let main = write(&dir, "nginx.conf", "http {\n    include conf.d/*.conf;\n}\n");
        let d = load(&main).unwrap();
        let http = d[0].children();
        let names: Vec<&str> = http.iter().map(|u| u.args[0].as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(http[0].at.to_string(), format!("{}:3", dir.join("conf.d/a.conf").display()));
    }

    #[test]
    fn mistakes_say_where() {
        let dir = temp_dir("mistakes");
        let err = |text: &str| format!("{:#}", load(&write(&dir, "bad.conf", text)).unwrap_err());
        assert!(err("http {\n server {\n listen 80;\n }\n").contains("bad.conf:4: a block is not closed"));
        assert!(err("worker_processes 4\n}\n").contains("bad.conf:2: directive \"worker_processes\" has no ending ';'"));
        assert!(err("}\n").contains("bad.conf:1: unexpected '}'"));
        assert!(err("log_format x 'abc;\n").contains("bad.conf:1: a quoted string is not closed"));
        assert!(err("include missing.conf;\n").contains("missing.conf: no such file"));
        let looped = write(&dir, "loop.conf", "include loop.conf;\n");
        assert!(format!("{:#}", load(&looped).unwrap_err()).contains("includes nest deeper than 16"));
    }
}

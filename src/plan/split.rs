//! Splits a pipeline file into statements, remembering where each starts and
//! the `--` comment block directly above it (its documentation).
//!
//! This is a small scanner, not a parser: it only needs to know where string
//! literals, quoted identifiers and comments are, so that a `;` inside them
//! does not end a statement.

/// One statement of a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawStatement {
    /// The statement text, without the trailing `;`.
    pub text: String,
    /// 1-based line of the statement's first character in the file.
    pub line: usize,
    /// The `--` comment lines directly above the statement, joined with `\n`.
    pub doc: String,
}

pub fn split_statements(source: &str) -> Vec<RawStatement> {
    let mut statements = Vec::new();
    let bytes = source.as_bytes();
    let mut i = 0;
    let mut line = 1;
    // Start of the current statement (byte offset), once non-blank text is seen.
    let mut start: Option<(usize, usize)> = None;
    // Comment lines seen since the last statement, and whether a blank line
    // separates them from what follows (which detaches them).
    let mut doc_lines: Vec<String> = Vec::new();
    let mut doc_for_current = String::new();
    let mut blank_run = 0;

    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                if start.is_none() {
                    blank_run += 1;
                    if blank_run >= 2 {
                        // an empty line between a comment and a statement
                        doc_lines.clear();
                    }
                }
                line += 1;
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                let end = source[i..].find('\n').map_or(bytes.len(), |n| i + n);
                if start.is_none() {
                    let text = source[i + 2..end].trim();
                    doc_lines.push(text.to_string());
                    blank_run = 0;
                }
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = source[i + 2..]
                    .find("*/")
                    .map_or(bytes.len(), |n| i + 2 + n + 2);
                line += source[i..end].matches('\n').count();
                i = end;
            }
            b'\'' | b'"' | b'`' => {
                if start.is_none() {
                    start = Some((i, line));
                    doc_for_current = doc_lines.join("\n");
                }
                let quote = c;
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == b'\n' {
                        line += 1;
                    }
                    if bytes[i] == quote {
                        // a doubled quote is an escaped quote
                        if bytes.get(i + 1) == Some(&quote) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b';' => {
                if let Some((s, l)) = start.take() {
                    statements.push(RawStatement {
                        text: source[s..i].trim_end().to_string(),
                        line: l,
                        doc: std::mem::take(&mut doc_for_current),
                    });
                }
                doc_lines.clear();
                blank_run = 0;
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                if start.is_none() {
                    start = Some((i, line));
                    doc_for_current = doc_lines.join("\n");
                    blank_run = 0;
                }
                i += 1;
            }
        }
    }
    if let Some((s, l)) = start {
        let text = source[s..].trim_end().to_string();
        if !text.is_empty() {
            statements.push(RawStatement {
                text,
                line: l,
                doc: doc_for_current,
            });
        }
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_with_lines_and_docs() {
        let src = "-- file header\n\n-- Telemetry.\n-- Every 5 s.\nCREATE TABLE t (a TEXT);\n\nCREATE VIEW v AS\nSELECT ';' AS x -- trailing\nFROM t;\n-- dangling";
        let s = split_statements(src);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].line, 5);
        assert_eq!(s[0].doc, "Telemetry.\nEvery 5 s.");
        assert_eq!(s[0].text, "CREATE TABLE t (a TEXT)");
        assert_eq!(s[1].line, 7);
        assert_eq!(s[1].doc, "");
        assert!(s[1].text.contains("';'"));
    }

    #[test]
    fn escaped_quotes_and_block_comments() {
        let src = "/* a;\n b */ CREATE VIEW v AS SELECT 'it''s;' FROM t;\nSELECT 1";
        let s = split_statements(src);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].line, 2);
        assert_eq!(s[1].line, 3);
        assert_eq!(s[1].text, "SELECT 1");
    }
}

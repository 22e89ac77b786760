//! The `pgoutput` logical decoding format, protocol version 1 — what
//! `pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version',
//! '1', 'publication_names', ...)` returns, one message per row
//! (PostgreSQL docs, "Logical Replication Message Formats").
//!
//! Only what a reference table needs is decoded: relations (to learn a
//! table's columns), inserts, updates, deletes and truncates, and the
//! commit LSN of their transaction. Values come in their text form.

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change (not sent).
    Unchanged,
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
    /// Which columns are part of the replica identity (the key).
    pub key: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
    },
    Commit {
        end_lsn: u64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        new: Vec<Value>,
    },
    /// `old` holds the key columns (or the whole old row with REPLICA IDENTITY FULL).
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Types, origins, logical messages: nothing a table needs.
    Other(u8),
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("pgoutput message truncated at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().map_err(|_| "u16")?,
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().map_err(|_| "u32")?,
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| "u64")?,
        ))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("pgoutput string without its terminating NUL")?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Value>, String> {
        let n = self.u16()? as usize;
        let mut values = Vec::with_capacity(n.min(1600));
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                }
                other => return Err(format!("pgoutput: unknown tuple value kind {other:#x}")),
            });
        }
        Ok(values)
    }
}

/// Decodes one message.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    let mut r = Reader { bytes, at: 0 };
    let kind = r.u8()?;
    Ok(match kind {
        b'B' => {
            let final_lsn = r.u64()?;
            Message::Begin { final_lsn }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            Message::Commit { end_lsn }
        }
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _identity = r.u8()?;
            let n = r.u16()? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            let mut key = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(r.cstr()?);
                let _type = r.u32()?;
                let _modifier = r.u32()?;
                key.push(flags & 1 == 1);
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                columns,
                key,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(format!("pgoutput insert: expected 'N', got {other:#x}")),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut tag = r.u8()?;
            if tag == b'K' || tag == b'O' {
                let _old = r.tuple()?;
                tag = r.u8()?;
            }
            if tag != b'N' {
                return Err(format!("pgoutput update: expected 'N', got {tag:#x}"));
            }
            Message::Update {
                relation,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                other => {
                    return Err(format!(
                        "pgoutput delete: expected 'K' or 'O', got {other:#x}"
                    ))
                }
            }
        }
        b'T' => {
            let n = r.u32()? as usize;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

/// `0/16B3748` (Postgres' text form of an LSN) as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A number as Postgres' text form of an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(t) => {
                    out.push(b't');
                    out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
            }
        }
    }

    #[test]
    fn messages_decode() {
        let mut rel = vec![b'R'];
        rel.extend_from_slice(&16385u32.to_be_bytes());
        cstr(&mut rel, "public");
        cstr(&mut rel, "terminals");
        rel.push(b'd');
        rel.extend_from_slice(&2u16.to_be_bytes());
        for (flags, name) in [(1u8, "terminal_id"), (0, "region")] {
            rel.push(flags);
            cstr(&mut rel, name);
            rel.extend_from_slice(&25u32.to_be_bytes());
            rel.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.columns, ["terminal_id", "region"]);
        assert_eq!(r.key, [true, false]);
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("public", "terminals")
        );

        let mut ins = vec![b'I'];
        ins.extend_from_slice(&16385u32.to_be_bytes());
        ins.push(b'N');
        tuple(&mut ins, &[Some("t1"), None]);
        assert_eq!(
            decode(&ins).unwrap(),
            Message::Insert {
                relation: 16385,
                new: vec![Value::Text("t1".into()), Value::Null]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend_from_slice(&16385u32.to_be_bytes());
        upd.push(b'K');
        tuple(&mut upd, &[Some("t0"), None]);
        upd.push(b'N');
        tuple(&mut upd, &[Some("t1"), Some("east")]);
        assert!(
            matches!(decode(&upd).unwrap(), Message::Update { new, .. } if new[1] == Value::Text("east".into()))
        );

        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&5u64.to_be_bytes());
        commit.extend_from_slice(&9u64.to_be_bytes());
        commit.extend_from_slice(&0u64.to_be_bytes());
        assert_eq!(decode(&commit).unwrap(), Message::Commit { end_lsn: 9 });
    }

    #[test]
    fn truncated_and_hostile_messages_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            b"I",
            b"I\0\0\0\x01N\0\x02t\xff\xff\xff\xff",
            b"R\0\0\0\x01public",
            b"U\0\0\0\x01X",
            b"D\0\0\0\x01N",
            b"T\xff\xff\xff\xff\0",
        ] {
            assert!(decode(bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(decode(b"Y").unwrap(), Message::Other(b'Y'));
    }

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0000_00FF), "1/FF");
        assert_eq!(parse_lsn("nope"), None);
    }
}

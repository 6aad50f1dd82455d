//! The checklist: steps with their status and timing, the root cause, the
//! fix, and the category that becomes the exit code.

use std::time::Instant;

use serde::Serialize;

/// The names of the steps, in the order a client takes them.
pub const STEPS: [&str; 11] = [
    "name resolution",
    "tcp connect",
    "tls",
    "/v2/ and auth challenge",
    "credentials",
    "repository and tag",
    "manifest",
    "platform",
    "blobs",
    "registry refusals",
    "timing",
];

/// What went wrong, by class; each has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Ok,
    Usage,
    Network,
    Tls,
    Auth,
    NotFound,
    Platform,
    Content,
    Refused,
}

impl Category {
    /// The process exit code (documented in `berth diagnose --help`).
    pub fn exit_code(self) -> u8 {
        match self {
            Category::Ok => 0,
            Category::Usage => 2,
            Category::Network => 10,
            Category::Tls => 11,
            Category::Auth => 12,
            Category::NotFound => 13,
            Category::Platform => 14,
            Category::Content => 15,
            Category::Refused => 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Fail,
    Warn,
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub status: Status,
    pub millis: u64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: String,
    pub steps: Vec<Step>,
    pub root_cause: Option<String>,
    pub fix: Option<String>,
    pub category: Category,
    pub exit_code: u8,
    #[serde(skip)]
    secrets: Vec<String>,
}

impl Report {
    pub fn new(image: &str) -> Report {
        Report {
            image: image.to_string(),
            steps: Vec::new(),
            root_cause: None,
            fix: None,
            category: Category::Ok,
            exit_code: 0,
            secrets: Vec::new(),
        }
    }

    /// Strings that must never appear in the output (passwords, tokens).
    pub fn secret(&mut self, s: &str) {
        if s.len() >= 3 {
            self.secrets.push(s.to_string());
        }
    }

    pub fn failed(&self) -> bool {
        self.root_cause.is_some()
    }

    pub fn push(&mut self, name: &str, status: Status, started: Instant, detail: String) {
        self.steps.push(Step {
            name: name.to_string(),
            status,
            millis: started.elapsed().as_millis() as u64,
            detail,
        });
    }

    pub fn ok(&mut self, name: &str, started: Instant, detail: String) {
        self.push(name, Status::Ok, started, detail);
    }

    pub fn warn(&mut self, name: &str, started: Instant, detail: String) {
        self.push(name, Status::Warn, started, detail);
    }

    /// The step failed: this is the root cause; later steps are skipped.
    pub fn fail(
        &mut self,
        name: &str,
        category: Category,
        started: Instant,
        detail: String,
        cause: String,
        fix: String,
    ) {
        self.push(name, Status::Fail, started, detail);
        self.root_cause = Some(cause);
        self.fix = Some(fix);
        self.category = category;
    }

    /// Marks the steps not reached as skipped, adds the timing step, and
    /// redacts every secret.
    pub fn finish(mut self, opts: &crate::Options) -> Report {
        if !self.failed() {
            let now = Instant::now();
            let slowest = self.steps.iter().max_by_key(|s| s.millis).cloned();
            let limit = opts.timeout.as_millis() as u64;
            match slowest {
                Some(s) if s.millis * 2 > limit => self.warn(
                    "timing",
                    now,
                    format!(
                        "{} took {} ms, more than half of the {} ms timeout: a client with a shorter one fails here",
                        s.name, s.millis, limit
                    ),
                ),
                Some(s) => self.ok("timing", now, format!("slowest step: {} ({} ms)", s.name, s.millis)),
                None => {}
            }
        }
        for name in STEPS {
            if !self.steps.iter().any(|s| s.name == name) {
                self.steps.push(Step {
                    name: name.to_string(),
                    status: Status::Skipped,
                    millis: 0,
                    detail: String::new(),
                });
            }
        }
        let order = |n: &str| STEPS.iter().position(|s| *s == n).unwrap_or(0);
        self.steps.sort_by_key(|s| order(&s.name));
        let secrets = std::mem::take(&mut self.secrets);
        let redact = |s: &mut String| {
            for x in &secrets {
                if s.contains(x.as_str()) {
                    *s = s.replace(x.as_str(), "<redacted>");
                }
            }
        };
        for st in &mut self.steps {
            redact(&mut st.detail);
        }
        if let Some(c) = &mut self.root_cause {
            redact(c);
        }
        if let Some(f) = &mut self.fix {
            redact(f);
        }
        self.exit_code = self.category.exit_code();
        self
    }

    /// The checklist, then `root cause:` and `fix:` lines.
    pub fn human(&self) -> String {
        let mut out = format!("berth diagnose {}\n", self.image);
        for (i, s) in self.steps.iter().enumerate() {
            let mark = match s.status {
                Status::Ok => "ok",
                Status::Fail => "FAIL",
                Status::Warn => "warn",
                Status::Skipped => "skipped",
            };
            let time = if s.status == Status::Skipped {
                String::new()
            } else {
                format!("{} ms", s.millis)
            };
            out.push_str(&format!(
                "  [{mark:^7}] {:>2}. {:<24} {time:>8}  {}\n",
                i + 1,
                s.name,
                s.detail
            ));
        }
        match (&self.root_cause, &self.fix) {
            (Some(c), Some(f)) => out.push_str(&format!("root cause: {c}\nfix: {f}\n")),
            _ => out.push_str("root cause: none: every step of the pull succeeded\n"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_skips_redacts_and_orders() {
        let mut r = Report::new("h/r:t");
        r.secret("hunter2");
        let t = Instant::now();
        r.ok("name resolution", t, "found".into());
        r.fail(
            "credentials",
            Category::Auth,
            t,
            "password hunter2 refused".into(),
            "bad hunter2".into(),
            "fix".into(),
        );
        let r = r.finish(&crate::Options::new("h/r:t"));
        assert_eq!(r.steps.len(), STEPS.len());
        assert_eq!(r.steps[4].name, "credentials");
        assert_eq!(r.steps[1].status, Status::Skipped);
        assert!(!r.human().contains("hunter2"), "{}", r.human());
        assert_eq!(r.exit_code, 12);
    }
}

//! Every S3 operation the store serves, declared once: the method and subresources that select
//! it, what it addresses (the service, a bucket or an object), the IAM action, and how the
//! resource is authorized. [`plan`] turns a request line into the operation and the bucket and
//! key it addresses; the dispatcher authorizes the ARN built from that same bucket and key and
//! hands the handler only those, so the resource authorized is the resource acted on by
//! construction. Resources a request names besides its address (a copy source, the keys of a
//! DeleteObjects body) are authorized by their handlers, as the `also` column says.

use super::*;

/// What an operation addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// No bucket: `GET /`.
    Service,
    /// `/<bucket>`.
    Bucket,
    /// `/<bucket>/<key>`.
    Object,
}

/// How the addressed resource is authorized before the handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// The action on the addressed bucket or object, in a bucket that exists and belongs to
    /// the caller's account.
    Owned,
    /// The action on the addressed resource in the caller's own account (there is no bucket
    /// yet, or none is addressed).
    OwnAccount,
    /// The bucket must exist and be the caller's account's; the handler authorizes the action
    /// on each element the body names.
    PerElement,
}

/// Which handler serves an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    ListBuckets,
    CreateBucket,
    DeleteBucket,
    HeadBucket,
    GetBucketLocation,
    ListObjects,
    ListMultipartUploads,
    DeleteObjects,
    GetObject,
    HeadObject,
    PutObject,
    CopyObject,
    DeleteObject,
    CreateMultipartUpload,
    UploadPart,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
}

/// Query parameters, as parsed.
pub(crate) type Query = [(String, String)];
/// Condition keys a request adds to its decision.
pub(crate) type ConditionKeys = Vec<(&'static str, String)>;

/// One declared operation.
#[derive(Debug)]
pub(crate) struct Operation {
    /// S3's name for it.
    pub name: &'static str,
    /// HTTP method.
    pub method: Method,
    /// The subresource parameters present, sorted and comma-joined (`""` for none).
    pub subresources: &'static str,
    /// What it addresses.
    pub scope: Scope,
    /// `Some(true)`: only with `x-amz-copy-source`; `Some(false)`: only without.
    pub copy_source: Option<bool>,
    /// The IAM action authorized on the addressed resource.
    pub action: &'static str,
    /// How.
    pub grant: Grant,
    /// Condition keys the request adds to the decision (ListBucket's `s3:prefix`...).
    pub context: fn(&Query) -> ConditionKeys,
    /// Other resources the handler authorizes itself (read by the tests and the reader).
    #[cfg_attr(not(test), allow(dead_code))]
    pub also: &'static str,
    /// The handler.
    pub kind: Kind,
}

fn no_context(_: &Query) -> ConditionKeys {
    Vec::new()
}

/// ListBucket's condition keys, from the query as sent (the handler validates it after).
fn list_context(query: &Query) -> ConditionKeys {
    let q = |n: &str| query.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let mut ctx = vec![("s3:prefix", q("prefix").unwrap_or("").to_owned())];
    match q("max-keys") {
        None => ctx.push(("s3:max-keys", "1000".into())),
        Some(v) => {
            if let Ok(n) = v.parse::<i64>()
                && n >= 0
            {
                ctx.push(("s3:max-keys", n.min(1000).to_string()));
            }
        }
    }
    if let Some(d) = q("delimiter").filter(|d| !d.is_empty()) {
        ctx.push(("s3:delimiter", d.to_owned()));
    }
    ctx
}

macro_rules! op {
    ($name:literal, $method:ident, $subs:literal, $scope:ident, $copy:expr, $action:literal, $grant:ident, $ctx:ident, $also:literal, $kind:ident) => {
        Operation {
            name: $name,
            method: Method::$method,
            subresources: $subs,
            scope: Scope::$scope,
            copy_source: $copy,
            action: $action,
            grant: Grant::$grant,
            context: $ctx,
            also: $also,
            kind: Kind::$kind,
        }
    };
}

/// Every operation served: name, method, subresources, scope, copy source, IAM action, grant,
/// condition keys, other resources, handler. A request matching none answers NotImplemented (or
/// MethodNotAllowed at the service level).
#[rustfmt::skip]
pub(crate) const OPERATIONS: &[Operation] = &[
    op!("ListBuckets", GET, "", Service, None, "s3:ListAllMyBuckets", OwnAccount, no_context, "", ListBuckets),
    op!("CreateBucket", PUT, "", Bucket, None, "s3:CreateBucket", OwnAccount, no_context, "", CreateBucket),
    op!("DeleteBucket", DELETE, "", Bucket, None, "s3:DeleteBucket", Owned, no_context, "", DeleteBucket),
    op!("HeadBucket", HEAD, "", Bucket, None, "s3:ListBucket", Owned, no_context, "", HeadBucket),
    op!("GetBucketLocation", GET, "location", Bucket, None, "s3:GetBucketLocation", Owned, no_context, "", GetBucketLocation),
    op!("ListObjects", GET, "", Bucket, None, "s3:ListBucket", Owned, list_context, "", ListObjects),
    op!("ListMultipartUploads", GET, "uploads", Bucket, None, "s3:ListBucketMultipartUploads", Owned, no_context, "", ListMultipartUploads),
    op!("DeleteObjects", POST, "delete", Bucket, None, "s3:DeleteObject", PerElement, no_context, "s3:DeleteObject on each key of the body", DeleteObjects),
    op!("GetObject", GET, "", Object, None, "s3:GetObject", Owned, no_context, "", GetObject),
    op!("HeadObject", HEAD, "", Object, None, "s3:GetObject", Owned, no_context, "", HeadObject),
    op!("PutObject", PUT, "", Object, Some(false), "s3:PutObject", Owned, no_context, "", PutObject),
    op!("CopyObject", PUT, "", Object, Some(true), "s3:PutObject", Owned, no_context, "s3:GetObject on x-amz-copy-source", CopyObject),
    op!("DeleteObject", DELETE, "", Object, None, "s3:DeleteObject", Owned, no_context, "", DeleteObject),
    op!("CreateMultipartUpload", POST, "uploads", Object, None, "s3:PutObject", Owned, no_context, "", CreateMultipartUpload),
    op!("UploadPart", PUT, "partNumber,uploadId", Object, Some(false), "s3:PutObject", Owned, no_context, "", UploadPart),
    op!("UploadPartCopy", PUT, "partNumber,uploadId", Object, Some(true), "s3:PutObject", Owned, no_context, "s3:GetObject on x-amz-copy-source", UploadPart),
    op!("CompleteMultipartUpload", POST, "uploadId", Object, None, "s3:PutObject", Owned, no_context, "", CompleteMultipartUpload),
    op!("AbortMultipartUpload", DELETE, "uploadId", Object, None, "s3:AbortMultipartUpload", Owned, no_context, "", AbortMultipartUpload),
    op!("ListParts", GET, "uploadId", Object, None, "s3:ListMultipartUploadParts", Owned, no_context, "", ListParts),
];

/// A request line resolved: the operation and what it addresses.
#[derive(Debug)]
pub(crate) struct Planned {
    pub operation: &'static Operation,
    pub bucket: String,
    pub key: String,
}

impl Planned {
    /// The ARN authorized: built from the very bucket and key the handler receives.
    pub fn resource(&self) -> String {
        match self.operation.scope {
            Scope::Service => "arn:aws:s3:::*".to_owned(),
            Scope::Bucket => bucket_arn(&self.bucket),
            Scope::Object => object_arn(&self.bucket, &self.key),
        }
    }
}

/// The subresources a query names, sorted and comma-joined. A subresource named twice is
/// refused: which of its values an operation would act on is ambiguous.
pub(crate) fn subresources(query: &[(String, String)]) -> Result<String, S3Error> {
    let mut subs: Vec<&str> = query
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| SUBRESOURCES.contains(k))
        .collect();
    subs.sort_unstable();
    let n = subs.len();
    subs.dedup();
    if subs.len() != n {
        return Err(invalid_argument(
            "A subresource parameter may appear only once",
            "subresource",
            &subs.join(","),
        ));
    }
    Ok(subs.join(","))
}

/// The operation a request selects and the bucket and key it addresses.
pub(crate) fn plan(
    method: &Method,
    address: Address,
    subresources: &str,
    copy_source: bool,
) -> Result<Planned, S3Error> {
    let (scope, bucket, key) = match (address.bucket, address.key) {
        (None, _) => (Scope::Service, String::new(), String::new()),
        (Some(b), None) => (Scope::Bucket, b, String::new()),
        (Some(b), Some(k)) => (Scope::Object, b, k),
    };
    if scope == Scope::Object && key.len() > MAX_KEY_LEN {
        return Err(S3Error::new(400, "KeyTooLongError", "Your key is too long")
            .with("MaxSizeAllowed", MAX_KEY_LEN.to_string())
            .with("Size", key.len().to_string()));
    }
    let found = OPERATIONS.iter().find(|o| {
        o.scope == scope
            && o.method == *method
            && o.subresources == subresources
            && o.copy_source.is_none_or(|c| c == copy_source)
    });
    match found {
        Some(operation) => Ok(Planned {
            operation,
            bucket,
            key,
        }),
        None if scope == Scope::Service => Err(S3Error::new(
            405,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        )),
        None => Err(not_implemented()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoints {
        Endpoints {
            region: "us-east-1".into(),
            domain: "localhost".into(),
        }
    }

    /// A request for `operation`, path-style or virtual-hosted, with extra query parameters.
    fn request(
        operation: &Operation,
        virtual_hosted: bool,
        extra: &[(&str, &str)],
    ) -> (Method, Address, String, bool) {
        let (bucket, key) = ("b1", "dir/k 1");
        let path = match (operation.scope, virtual_hosted) {
            (Scope::Service, _) => "/".to_owned(),
            (Scope::Bucket, false) => format!("/{bucket}"),
            (Scope::Bucket, true) => "/".to_owned(),
            (Scope::Object, false) => format!("/{bucket}/dir/k%201"),
            (Scope::Object, true) => "/dir/k%201".to_owned(),
        };
        let host = if virtual_hosted && operation.scope != Scope::Service {
            format!("{bucket}.s3.us-east-1.localhost:9444")
        } else {
            "localhost:9444".to_owned()
        };
        let _ = key;
        let addr = address(&ep(), &host, &path).unwrap();
        let mut query: Vec<(String, String)> = operation
            .subresources
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| (s.to_owned(), "7".to_owned()))
            .collect();
        query.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let subs = subresources(&query).unwrap();
        (
            operation.method.clone(),
            addr,
            subs,
            operation.copy_source == Some(true),
        )
    }

    /// Every declared operation is selected by its own request line, addressed either way,
    /// and authorizes the ARN of exactly the bucket and key its handler receives.
    #[test]
    fn every_operation_authorizes_what_it_addresses() {
        for operation in OPERATIONS {
            for virtual_hosted in [false, true] {
                // `x-id` (SDKs add it) and other plain parameters change nothing.
                for extra in [&[][..], &[("x-id", "Other"), ("prefix", "p")][..]] {
                    let (method, address, subs, copy) = request(operation, virtual_hosted, extra);
                    let planned = plan(&method, address, &subs, copy).unwrap();
                    assert_eq!(planned.operation.name, operation.name);
                    let (bucket, key) = match operation.scope {
                        Scope::Service => ("", ""),
                        Scope::Bucket => ("b1", ""),
                        Scope::Object => ("b1", "dir/k 1"),
                    };
                    assert_eq!(
                        (planned.bucket.as_str(), planned.key.as_str()),
                        (bucket, key),
                        "{}",
                        operation.name
                    );
                    let arn = match operation.scope {
                        Scope::Service => "arn:aws:s3:::*".to_owned(),
                        Scope::Bucket => "arn:aws:s3:::b1".to_owned(),
                        Scope::Object => "arn:aws:s3:::b1/dir/k 1".to_owned(),
                    };
                    assert_eq!(planned.resource(), arn, "{}", operation.name);
                }
            }
        }
    }

    /// Operations that act on more than their address say so, and only they.
    #[test]
    fn secondary_resources_are_declared() {
        for o in OPERATIONS {
            let secondary = o.copy_source == Some(true) || o.grant == Grant::PerElement;
            assert_eq!(!o.also.is_empty(), secondary, "{}", o.name);
        }
    }

    #[test]
    fn each_request_line_selects_at_most_one_operation() {
        for a in OPERATIONS {
            for b in OPERATIONS {
                if std::ptr::eq(a, b) {
                    continue;
                }
                let overlap = a.scope == b.scope
                    && a.method == b.method
                    && a.subresources == b.subresources
                    && match (a.copy_source, b.copy_source) {
                        (Some(x), Some(y)) => x == y,
                        _ => true,
                    };
                assert!(!overlap, "{} and {} overlap", a.name, b.name);
            }
        }
    }

    /// A virtual-hosted bucket wins over a bucket-like path: the path is all key, and the key
    /// is what is authorized.
    #[test]
    fn conflicting_addresses_authorize_what_is_acted_on() {
        let addr = address(&ep(), "b1.s3.us-east-1.localhost", "/b2/k").unwrap();
        let p = plan(&Method::DELETE, addr, "", false).unwrap();
        assert_eq!(p.operation.name, "DeleteObject");
        assert_eq!((p.bucket.as_str(), p.key.as_str()), ("b1", "b2/k"));
        assert_eq!(p.resource(), "arn:aws:s3:::b1/b2/k");
    }

    #[test]
    fn unknown_combinations_and_repeated_subresources_are_refused() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let err = subresources(&q(&[("uploadId", "a"), ("uploadId", "b")])).unwrap_err();
        assert_eq!(err.code, "InvalidArgument");
        // Two operations' subresources at once select neither.
        let subs = subresources(&q(&[("uploads", ""), ("uploadId", "a")])).unwrap();
        let addr = address(&ep(), "localhost", "/b1/k").unwrap();
        assert_eq!(
            plan(&Method::POST, addr, &subs, false).unwrap_err().code,
            "NotImplemented"
        );
        let addr = address(&ep(), "localhost", "/").unwrap();
        assert_eq!(
            plan(&Method::PUT, addr, "", false).unwrap_err().code,
            "MethodNotAllowed"
        );
        let long = format!("/b1/{}", "k".repeat(MAX_KEY_LEN + 1));
        let addr = address(&ep(), "localhost", &long).unwrap();
        assert_eq!(
            plan(&Method::GET, addr, "", false).unwrap_err().code,
            "KeyTooLongError"
        );
        let ok = format!("/b1/{}", "k".repeat(MAX_KEY_LEN));
        let addr = address(&ep(), "localhost", &ok).unwrap();
        assert!(plan(&Method::GET, addr, "", false).is_ok());
    }

    #[test]
    fn list_condition_keys_come_from_the_query() {
        let q = vec![
            ("prefix".to_owned(), "logs/".to_owned()),
            ("max-keys".to_owned(), "5000".to_owned()),
            ("delimiter".to_owned(), "/".to_owned()),
        ];
        assert_eq!(
            list_context(&q),
            vec![
                ("s3:prefix", "logs/".to_owned()),
                ("s3:max-keys", "1000".to_owned()),
                ("s3:delimiter", "/".to_owned())
            ]
        );
        assert_eq!(
            list_context(&[]),
            vec![
                ("s3:prefix", String::new()),
                ("s3:max-keys", "1000".to_owned())
            ]
        );
    }
}

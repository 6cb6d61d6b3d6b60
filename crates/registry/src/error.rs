/// A refused registry operation. Each variant is one AWS IoT exception; the control plane maps
/// it to the exception's name and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// `InvalidRequestException` (400).
    #[error("{0}")]
    InvalidRequest(String),
    /// `ResourceNotFoundException` (404).
    #[error("{0}")]
    NotFound(String),
    /// `ResourceAlreadyExistsException` (409).
    #[error("{message}")]
    AlreadyExists {
        /// Message.
        message: String,
        /// The existing resource's id.
        resource_id: String,
        /// The existing resource's ARN.
        resource_arn: String,
    },
    /// `DeleteConflictException` (409).
    #[error("{0}")]
    DeleteConflict(String),
    /// `VersionConflictException` (409).
    #[error("{0}")]
    VersionConflict(String),
    /// `VersionsLimitExceededException` (409).
    #[error("{0}")]
    VersionsLimitExceeded(String),
    /// `CertificateStateException` (406).
    #[error("{0}")]
    CertificateState(String),
    /// `CertificateValidationException` (400).
    #[error("{0}")]
    CertificateValidation(String),
    /// `MalformedPolicyException` (400).
    #[error("{0}")]
    MalformedPolicy(String),
    /// `LimitExceededException` (410).
    #[error("{0}")]
    LimitExceeded(String),
    /// `RegistrationCodeValidationException` (400).
    #[error("{0}")]
    RegistrationCodeValidation(String),
    /// `CertificateConflictException` (409).
    #[error("{0}")]
    CertificateConflict(String),
    /// `ConflictException` (409): a resource of that id exists (job templates).
    #[error("{0}")]
    Conflict(String),
    /// `PreconditionFailedException` (412): a revision that is not the latest.
    #[error("{0}")]
    PreconditionFailed(String),
    /// `InvalidStateTransitionException` (409): a job or execution cannot go to that state.
    #[error("{0}")]
    InvalidStateTransition(String),
    /// `TerminalStateException` (410): the job execution has ended.
    #[error("{0}")]
    TerminalState(String),
    /// `InternalFailureException` (500).
    #[error("{0}")]
    Internal(String),
    /// `ServiceUnavailableException` (503): the cluster's registry log cannot be written now
    /// (the SDKs try again).
    #[error("{0}")]
    Unavailable(String),
}

impl RegistryError {
    /// The AWS exception name and HTTP status.
    pub fn aws_code(&self) -> (&'static str, u16) {
        match self {
            RegistryError::InvalidRequest(_) => ("InvalidRequestException", 400),
            RegistryError::NotFound(_) => ("ResourceNotFoundException", 404),
            RegistryError::AlreadyExists { .. } => ("ResourceAlreadyExistsException", 409),
            RegistryError::DeleteConflict(_) => ("DeleteConflictException", 409),
            RegistryError::VersionConflict(_) => ("VersionConflictException", 409),
            RegistryError::VersionsLimitExceeded(_) => ("VersionsLimitExceededException", 409),
            RegistryError::CertificateState(_) => ("CertificateStateException", 406),
            RegistryError::CertificateValidation(_) => ("CertificateValidationException", 400),
            RegistryError::MalformedPolicy(_) => ("MalformedPolicyException", 400),
            RegistryError::LimitExceeded(_) => ("LimitExceededException", 410),
            RegistryError::RegistrationCodeValidation(_) => {
                ("RegistrationCodeValidationException", 400)
            }
            RegistryError::CertificateConflict(_) => ("CertificateConflictException", 409),
            RegistryError::Conflict(_) => ("ConflictException", 409),
            RegistryError::PreconditionFailed(_) => ("PreconditionFailedException", 412),
            RegistryError::InvalidStateTransition(_) => ("InvalidStateTransitionException", 409),
            RegistryError::TerminalState(_) => ("TerminalStateException", 410),
            RegistryError::Internal(_) => ("InternalFailureException", 500),
            RegistryError::Unavailable(_) => ("ServiceUnavailableException", 503),
        }
    }
}

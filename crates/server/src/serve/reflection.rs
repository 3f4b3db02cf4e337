//! Server reflection (`grpc.reflection.v1` and `grpc.reflection.v1alpha`): the services this
//! server answers and the descriptors of their files, with failed lookups answered inside
//! the stream, as the reflection protocol says.
//!
//! tonic-reflection's server ends the whole stream with a status when a symbol or a file is
//! unknown (NOT_FOUND) or a request asks nothing (INVALID_ARGUMENT): the client's next
//! request on that stream is never answered, and clients that read the protocol's
//! `error_response` (Python's `grpc_reflection` turns NOT_FOUND into a `KeyError`) fail
//! instead. Here every request gets a `ServerReflectionResponse`, an `error_response` (the
//! gRPC code number and a message) when the lookup fails, and the stream goes on. Only
//! tonic-reflection's generated messages and service traits are used.
//!
//! The answers are tonic-reflection's otherwise: the listed names are given (not taken from
//! the descriptor sets), a file is answered alone (the client asks for its imports by
//! name), its bytes as they were registered, and the symbols are indexed as tonic-reflection
//! indexes them (plus enum values in their enum's scope, protobuf's own name for them, and
//! extension fields).
//!
//! v1 and v1alpha have distinct message types of the same shape: [`ReflectionIndex`] answers
//! version-neutral [`Question`]s, and `reflection_protocol!` writes the conversion from and
//! to each version's messages from one text.
//!
//! One stream is one [`Conversation`]. It reads the next request only when the transport
//! asks for the next answer, so nothing queues on the server: a client that sends without
//! reading is held back by HTTP/2 flow control. No task is spawned per stream. A
//! conversation ends when the client ends its side (OK), when the client's side fails (its
//! status, as tonic's decoder gives it, with the `fairrank-error-reason` every error
//! carries: a message that does not decode is INTERNAL, one above `server.max_message_bytes`
//! RESOURCE_EXHAUSTED, as every service answers it), or when the server's graceful shutdown starts (UNAVAILABLE), so an open,
//! idle stream does not hold up the drain.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use prost::Message as _;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Code, Status};

/// Most bytes of a client's text that an error message repeats.
const MAX_ECHOED_BYTES: usize = 200;

/// An encoded `FileDescriptorSet` read with each file's bytes kept as they were encoded:
/// decoding into `prost_types` and encoding again would drop the fields prost does not
/// know (custom options).
#[derive(Clone, PartialEq, prost::Message)]
struct EncodedFiles {
    #[prost(bytes = "vec", repeated, tag = "1")]
    file: Vec<Vec<u8>>,
}

/// What reflection serves: the listed service names, each registered file's encoded
/// descriptor by file name, and for each symbol the file that defines it.
#[derive(Debug)]
pub struct ReflectionIndex {
    services: Vec<String>,
    files: HashMap<String, Arc<[u8]>>,
    symbols: HashMap<String, Arc<[u8]>>,
}

impl ReflectionIndex {
    /// The index this server serves: `served` (the services it answers, as health reports
    /// them), health and both reflection versions are listed; the API's descriptor set
    /// (`super::api_descriptors`), health's and both reflection versions' are described.
    /// Without the explicit list every service of the descriptor sets would be listed, the
    /// Echo benchmark even when it is off.
    pub fn of_server(served: &[&str], api_descriptors: &[u8]) -> anyhow::Result<Self> {
        let listed = served.iter().copied().chain([
            tonic_health::pb::health_server::SERVICE_NAME,
            tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
            tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
        ]);
        Self::new(
            listed.map(str::to_owned).collect(),
            &[
                api_descriptors,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                // Both reflection versions are listed, so both are described.
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
        )
    }

    /// An index listing `services` and describing the files of `descriptor_sets` (encoded
    /// `FileDescriptorSet`s). A file name seen twice keeps its first descriptor.
    pub fn new(services: Vec<String>, descriptor_sets: &[&[u8]]) -> anyhow::Result<Self> {
        let mut index = ReflectionIndex {
            services,
            files: HashMap::new(),
            symbols: HashMap::new(),
        };
        for (position, set) in descriptor_sets.iter().enumerate() {
            let encoded = EncodedFiles::decode(*set)
                .with_context(|| format!("decoding descriptor set {position}"))?;
            for raw in encoded.file {
                let file = FileDescriptorProto::decode(raw.as_slice())
                    .with_context(|| format!("decoding a file of descriptor set {position}"))?;
                index
                    .add_file(&file, Arc::from(raw))
                    .with_context(|| format!("indexing {:?}", file.name()))?;
            }
        }
        Ok(index)
    }

    fn add_file(&mut self, file: &FileDescriptorProto, raw: Arc<[u8]>) -> anyhow::Result<()> {
        let name = file.name.clone().context("a file without a name")?;
        if self.files.contains_key(&name) {
            return Ok(());
        }
        self.files.insert(name, Arc::clone(&raw));
        let package = file.package();
        for message in &file.message_type {
            self.add_message(&raw, package, message)?;
        }
        for enumeration in &file.enum_type {
            self.add_enum(&raw, package, enumeration)?;
        }
        for extension in &file.extension {
            self.add_symbol(&raw, package, extension.name.as_deref(), "extension")?;
        }
        for service in &file.service {
            let service_name =
                self.add_symbol(&raw, package, service.name.as_deref(), "service")?;
            for method in &service.method {
                self.add_symbol(&raw, &service_name, method.name.as_deref(), "method")?;
            }
        }
        Ok(())
    }

    fn add_message(
        &mut self,
        raw: &Arc<[u8]>,
        scope: &str,
        message: &DescriptorProto,
    ) -> anyhow::Result<()> {
        let message_name = self.add_symbol(raw, scope, message.name.as_deref(), "message")?;
        for nested in &message.nested_type {
            self.add_message(raw, &message_name, nested)?;
        }
        for enumeration in &message.enum_type {
            self.add_enum(raw, &message_name, enumeration)?;
        }
        for field in &message.field {
            self.add_symbol(raw, &message_name, field.name.as_deref(), "field")?;
        }
        for extension in &message.extension {
            self.add_symbol(raw, &message_name, extension.name.as_deref(), "extension")?;
        }
        for oneof in &message.oneof_decl {
            self.add_symbol(raw, &message_name, oneof.name.as_deref(), "oneof")?;
        }
        Ok(())
    }

    /// An enum and its values, each value twice: in the enum's scope (protobuf's full name,
    /// `pkg.VALUE`) and under the enum (`pkg.Enum.VALUE`, as tonic-reflection has it).
    fn add_enum(
        &mut self,
        raw: &Arc<[u8]>,
        scope: &str,
        enumeration: &EnumDescriptorProto,
    ) -> anyhow::Result<()> {
        let enum_name = self.add_symbol(raw, scope, enumeration.name.as_deref(), "enum")?;
        for value in &enumeration.value {
            self.add_symbol(raw, scope, value.name.as_deref(), "enum value")?;
            self.add_symbol(raw, &enum_name, value.name.as_deref(), "enum value")?;
        }
        Ok(())
    }

    /// Indexes `scope.name` (or `name` at the root) as defined by the file `raw`; its full
    /// name. A later definition of the same name replaces an earlier one.
    fn add_symbol(
        &mut self,
        raw: &Arc<[u8]>,
        scope: &str,
        name: Option<&str>,
        kind: &str,
    ) -> anyhow::Result<String> {
        let name = name.with_context(|| format!("a {kind} without a name in {scope:?}"))?;
        let full_name = if scope.is_empty() {
            name.to_owned()
        } else {
            format!("{scope}.{name}")
        };
        self.symbols.insert(full_name.clone(), Arc::clone(raw));
        Ok(full_name)
    }

    /// The answer to `question`.
    fn answer(&self, question: Question<'_>) -> Answer<'_> {
        match question {
            Question::ListServices => Answer::Services(&self.services),
            Question::FileByFilename(name) => match self.files.get(name) {
                Some(file) => Answer::File(file),
                None => Answer::error(Code::NotFound, format!("file {} not found", quoted(name))),
            },
            Question::FileContainingSymbol(symbol) => match self.symbols.get(symbol) {
                Some(file) => Answer::File(file),
                None => Answer::error(
                    Code::NotFound,
                    format!("symbol {} not found", quoted(symbol)),
                ),
            },
            Question::FileContainingExtension {
                containing_type,
                extension_number,
            } => Answer::error(
                Code::Unimplemented,
                format!(
                    "file_containing_extension is not supported (asked for extension \
                     {extension_number} of {})",
                    quoted(containing_type)
                ),
            ),
            // As tonic-reflection answers: grpcurl asks this for every message it
            // describes and fails on an error.
            Question::AllExtensionNumbersOfType(_) => Answer::NoExtensionNumbers,
            Question::Nothing => Answer::error(
                Code::InvalidArgument,
                "the request asks nothing: message_request is not set".to_owned(),
            ),
        }
    }
}

/// `text` quoted and escaped for an error message, clipped to its first
/// [`MAX_ECHOED_BYTES`] bytes (at a character boundary) with its length when longer.
fn quoted(text: &str) -> String {
    fairness::quote_clipped_to(text, MAX_ECHOED_BYTES)
}

/// What a reflection request asks, whatever the protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Question<'a> {
    FileByFilename(&'a str),
    FileContainingSymbol(&'a str),
    FileContainingExtension {
        containing_type: &'a str,
        extension_number: i32,
    },
    AllExtensionNumbersOfType(&'a str),
    ListServices,
    /// The request's `message_request` is not set.
    Nothing,
}

/// The answer to a [`Question`], whatever the protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer<'a> {
    /// An encoded `FileDescriptorProto`.
    File(&'a [u8]),
    Services(&'a [String]),
    /// An `ExtensionNumberResponse` with no numbers (and no type name), as tonic-reflection
    /// answers.
    NoExtensionNumbers,
    /// An `error_response`.
    Error {
        code: Code,
        message: String,
    },
}

impl Answer<'_> {
    fn error(code: Code, message: String) -> Self {
        Answer::Error { code, message }
    }
}

/// One version of the reflection protocol: its messages, and how a request is answered
/// (implemented by `reflection_protocol!`).
pub trait Protocol: fmt::Debug + Send + Sync + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// The response to `request`, which it carries as `original_request`.
    fn respond(index: &ReflectionIndex, request: Self::Request) -> Self::Response;
}

/// Implements [`Protocol`] for the marker type `$protocol` over the messages of
/// `tonic_reflection::pb::$version`, and its reflection service for [`Reflection`].
macro_rules! reflection_protocol {
    ($protocol:ident, $version:ident) => {
        #[doc = concat!("Reflection `grpc.reflection.", stringify!($version), "`.")]
        #[derive(Debug, Clone, Copy)]
        pub struct $protocol;

        impl Protocol for $protocol {
            type Request = tonic_reflection::pb::$version::ServerReflectionRequest;
            type Response = tonic_reflection::pb::$version::ServerReflectionResponse;

            fn respond(index: &ReflectionIndex, request: Self::Request) -> Self::Response {
                use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
                use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
                use tonic_reflection::pb::$version::{
                    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse,
                    ListServiceResponse, ServiceResponse,
                };
                let question = match &request.message_request {
                    Some(MessageRequest::FileByFilename(name)) => Question::FileByFilename(name),
                    Some(MessageRequest::FileContainingSymbol(symbol)) => {
                        Question::FileContainingSymbol(symbol)
                    }
                    Some(MessageRequest::FileContainingExtension(extension)) => {
                        Question::FileContainingExtension {
                            containing_type: &extension.containing_type,
                            extension_number: extension.extension_number,
                        }
                    }
                    Some(MessageRequest::AllExtensionNumbersOfType(name)) => {
                        Question::AllExtensionNumbersOfType(name)
                    }
                    Some(MessageRequest::ListServices(_)) => Question::ListServices,
                    None => Question::Nothing,
                };
                let message_response = match index.answer(question) {
                    Answer::File(file) => {
                        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                            file_descriptor_proto: vec![file.to_vec()],
                        })
                    }
                    Answer::Services(names) => {
                        MessageResponse::ListServicesResponse(ListServiceResponse {
                            service: names
                                .iter()
                                .map(|name| ServiceResponse { name: name.clone() })
                                .collect(),
                        })
                    }
                    Answer::NoExtensionNumbers => MessageResponse::AllExtensionNumbersResponse(
                        ExtensionNumberResponse::default(),
                    ),
                    Answer::Error { code, message } => {
                        MessageResponse::ErrorResponse(ErrorResponse {
                            error_code: code as i32,
                            error_message: message,
                        })
                    }
                };
                Self::Response {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(message_response),
                }
            }
        }

        #[tonic::async_trait]
        impl tonic_reflection::pb::$version::server_reflection_server::ServerReflection
            for Reflection<$protocol>
        {
            type ServerReflectionInfoStream =
                Conversation<$protocol, tonic::Streaming<<$protocol as Protocol>::Request>>;

            async fn server_reflection_info(
                &self,
                request: tonic::Request<tonic::Streaming<<$protocol as Protocol>::Request>>,
            ) -> Result<tonic::Response<Self::ServerReflectionInfoStream>, Status> {
                Ok(tonic::Response::new(
                    self.conversation(request.into_inner()),
                ))
            }
        }
    };
}

reflection_protocol!(V1, v1);
reflection_protocol!(V1alpha, v1alpha);

/// The generated v1 reflection server over our service.
pub type ReflectionV1 =
    tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<Reflection<V1>>;
/// The generated v1alpha reflection server over our service.
pub type ReflectionV1alpha =
    tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer<
        Reflection<V1alpha>,
    >;

/// Both reflection services over `index`, reading request messages of up to
/// `max_message_bytes` (`server.max_message_bytes`); their streams end once `stop` is
/// raised (the start of the graceful shutdown).
pub fn services(
    index: ReflectionIndex,
    stop: &watch::Receiver<bool>,
    max_message_bytes: usize,
) -> (ReflectionV1, ReflectionV1alpha) {
    let index = Arc::new(index);
    let v1 = Reflection::<V1>::new(Arc::clone(&index), stop.clone());
    let v1alpha = Reflection::<V1alpha>::new(index, stop.clone());
    (
        ReflectionV1::new(v1).max_decoding_message_size(max_message_bytes),
        ReflectionV1alpha::new(v1alpha).max_decoding_message_size(max_message_bytes),
    )
}

/// The reflection service of protocol version `P`.
#[derive(Debug)]
pub struct Reflection<P> {
    index: Arc<ReflectionIndex>,
    stop: watch::Receiver<bool>,
    protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol> Reflection<P> {
    fn new(index: Arc<ReflectionIndex>, stop: watch::Receiver<bool>) -> Self {
        Reflection {
            index,
            stop,
            protocol: PhantomData,
        }
    }

    fn conversation<Requests>(&self, requests: Requests) -> Conversation<P, Requests> {
        Conversation::new(requests, Arc::clone(&self.index), self.stop.clone())
    }
}

/// One reflection stream: answers each request of `Requests` in turn, reading it only
/// when the next answer is asked for; ends with the client's side (OK), with its failure
/// (its status), or with the server's shutdown (UNAVAILABLE).
pub struct Conversation<P, Requests> {
    requests: Requests,
    index: Arc<ReflectionIndex>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
    protocol: PhantomData<fn() -> P>,
}

impl<P, Requests> Conversation<P, Requests> {
    fn new(requests: Requests, index: Arc<ReflectionIndex>, stop: watch::Receiver<bool>) -> Self {
        Conversation {
            requests,
            index,
            shutdown: Box::pin(super::raised(stop)),
            ended: false,
            protocol: PhantomData,
        }
    }
}

impl<P, Requests> fmt::Debug for Conversation<P, Requests> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Conversation")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<P, Requests> Stream for Conversation<P, Requests>
where
    P: Protocol,
    Requests: Stream<Item = Result<P::Request, Status>> + Unpin,
{
    type Item = Result<P::Response, Status>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.shutdown.as_mut().poll(context).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(api::status::error_status(
                Code::Unavailable,
                "the server is shutting down: its reflection streams end as the drain starts",
                api::fairrank::v1::ErrorReason::NotServing,
                None,
            ))));
        }
        match Pin::new(&mut this.requests).poll_next(context) {
            Poll::Ready(Some(Ok(request))) => {
                Poll::Ready(Some(Ok(P::respond(&this.index, request))))
            }
            // The client's side failed: a message that does not decode (tonic's status)
            // or is above `server.max_message_bytes` (RESOURCE_EXHAUSTED, as every service
            // answers it), with the reason every fairrank error carries (it goes out in the
            // stream's trailers).
            Poll::Ready(Some(Err(status))) => {
                this.ended = true;
                Poll::Ready(Some(Err(super::errors::uniform_transport_status(status))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_reflection::pb::v1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    /// The services a server with the Admin service lists before health and reflection.
    const SERVED: [&str; 2] = ["fairrank.v1.Ranker", "fairrank.v1.Admin"];

    fn api_descriptors() -> Vec<u8> {
        super::super::api_descriptors(false).expect("the API's descriptor set")
    }

    /// The index a server with the Admin service (and without Echo) serves.
    fn server_index() -> ReflectionIndex {
        ReflectionIndex::of_server(&SERVED, &api_descriptors()).expect("the index builds")
    }

    fn file_of(answer: &Answer<'_>) -> FileDescriptorProto {
        match answer {
            Answer::File(file) => FileDescriptorProto::decode(*file).expect("a descriptor"),
            other => panic!("a file expected, got {other:?}"),
        }
    }

    fn request(message_request: Option<MessageRequest>) -> v1::ServerReflectionRequest {
        v1::ServerReflectionRequest {
            host: "test-host".to_owned(),
            message_request,
        }
    }

    fn symbol_request(symbol: &str) -> v1::ServerReflectionRequest {
        request(Some(MessageRequest::FileContainingSymbol(
            symbol.to_owned(),
        )))
    }

    /// The error code of an `error_response`, `None` for any other answer.
    fn error_code(response: &v1::ServerReflectionResponse) -> Option<i32> {
        match &response.message_response {
            Some(MessageResponse::ErrorResponse(error)) => Some(error.error_code),
            _ => None,
        }
    }

    #[test]
    fn the_list_is_exactly_the_served_services_then_health_and_reflection() {
        let index = server_index();
        let expected = [
            "fairrank.v1.Ranker",
            "fairrank.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .map(str::to_owned);
        assert_eq!(
            index.answer(Question::ListServices),
            Answer::Services(&expected)
        );
        // Echo is off: its package is neither listed nor described.
        assert!(matches!(
            index.answer(Question::FileContainingSymbol("fairrank.bench.v1.Echo")),
            Answer::Error {
                code: Code::NotFound,
                ..
            }
        ));
    }

    #[test]
    fn unknown_symbols_and_files_are_not_found_answers_naming_them() {
        let index = server_index();
        for (question, name) in [
            (
                Question::FileContainingSymbol("fairrank.v1.Nope"),
                "fairrank.v1.Nope",
            ),
            (Question::FileByFilename("nope.proto"), "nope.proto"),
            // A package is no symbol (tonic-reflection does not index packages either).
            (Question::FileContainingSymbol("fairrank.v1"), "fairrank.v1"),
        ] {
            match index.answer(question) {
                Answer::Error { code, message } => {
                    assert_eq!(code, Code::NotFound, "{question:?}");
                    assert!(message.contains(&format!("\"{name}\"")), "{message}");
                }
                other => panic!("{question:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn client_text_in_error_messages_is_clipped() {
        let index = server_index();
        for long in ["x".repeat(10_000), "é".repeat(5_000)] {
            let Answer::Error { message, .. } = index.answer(Question::FileContainingSymbol(&long))
            else {
                panic!("an error expected");
            };
            assert!(message.len() < 300, "{} bytes: {message}", message.len());
            assert!(message.contains("(10000 bytes)"), "{message}");
        }
        assert_eq!(quoted("a\u{1b}b"), "\"a\\u{1b}b\"");
        assert_eq!(quoted(&"y".repeat(200)), format!("\"{}\"", "y".repeat(200)));
    }

    #[test]
    fn every_kind_of_symbol_resolves_to_the_file_that_defines_it() {
        let index = server_index();
        for (symbol, file) in [
            ("fairrank.v1.Ranker", "fairrank/v1/ranker.proto"),
            ("fairrank.v1.Ranker.Rank", "fairrank/v1/ranker.proto"),
            ("fairrank.v1.Admin.GetStatus", "fairrank/v1/admin.proto"),
            ("fairrank.v1.RankRequest", "fairrank/v1/ranker.proto"),
            ("fairrank.v1.RankRequest.k", "fairrank/v1/ranker.proto"),
            ("fairrank.v1.RankRequest.user", "fairrank/v1/ranker.proto"),
            ("fairrank.v1.ExplainLevel", "fairrank/v1/ranker.proto"),
            (
                "fairrank.v1.PrivacyPolicy.budget",
                "fairrank/v1/privacy.proto",
            ),
            ("fairrank.v1.TableKind", "fairrank/v1/common.proto"),
            // Nested messages and enums, enum values under their enum and in its scope.
            (
                "google.protobuf.Struct.FieldsEntry",
                "google/protobuf/struct.proto",
            ),
            (
                "google.protobuf.Struct.FieldsEntry.value",
                "google/protobuf/struct.proto",
            ),
            (
                "google.protobuf.NullValue.NULL_VALUE",
                "google/protobuf/struct.proto",
            ),
            ("google.protobuf.NULL_VALUE", "google/protobuf/struct.proto"),
            ("google.protobuf.Value.kind", "google/protobuf/struct.proto"),
            (
                "google.protobuf.Timestamp",
                "google/protobuf/timestamp.proto",
            ),
            (
                "grpc.health.v1.HealthCheckResponse.ServingStatus",
                "health.proto",
            ),
            (
                "grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING",
                "health.proto",
            ),
            ("grpc.health.v1.HealthCheckResponse.SERVING", "health.proto"),
            (
                "grpc.reflection.v1.ServerReflection.ServerReflectionInfo",
                "reflection_v1.proto",
            ),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                "reflection_v1alpha.proto",
            ),
        ] {
            let answer = index.answer(Question::FileContainingSymbol(symbol));
            let found = file_of(&answer);
            assert!(
                found.name() == file || found.name().ends_with(&format!("/{file}")),
                "{symbol}: {} instead of {file}",
                found.name()
            );
            // The same bytes by the file's name.
            assert_eq!(
                index.answer(Question::FileByFilename(found.name())),
                answer,
                "{symbol}"
            );
        }
    }

    #[test]
    fn extensions_are_symbols_and_their_lookups_are_answered_in_the_stream() {
        use prost_types::{FieldDescriptorProto, FileDescriptorSet, field_descriptor_proto};
        let extension = |name: &str, number: i32| FieldDescriptorProto {
            name: Some(name.to_owned()),
            number: Some(number),
            extendee: Some(".ext.Base".to_owned()),
            r#type: Some(field_descriptor_proto::Type::String as i32),
            ..FieldDescriptorProto::default()
        };
        let file = FileDescriptorProto {
            name: Some("ext.proto".to_owned()),
            package: Some("ext".to_owned()),
            message_type: vec![DescriptorProto {
                name: Some("Base".to_owned()),
                extension: vec![extension("inner_note", 101)],
                ..DescriptorProto::default()
            }],
            extension: vec![extension("note", 100)],
            ..FileDescriptorProto::default()
        };
        let set = FileDescriptorSet { file: vec![file] }.encode_to_vec();
        let index = ReflectionIndex::new(Vec::new(), &[&set]).expect("the index builds");
        for symbol in ["ext.note", "ext.Base.inner_note", "ext.Base"] {
            assert_eq!(
                file_of(&index.answer(Question::FileContainingSymbol(symbol))).name(),
                "ext.proto"
            );
        }
        let answer = index.answer(Question::FileContainingExtension {
            containing_type: "ext.Base",
            extension_number: 100,
        });
        let Answer::Error { code, message } = answer else {
            panic!("an error expected: {answer:?}");
        };
        assert_eq!(code, Code::Unimplemented);
        assert!(message.contains("100 of \"ext.Base\""), "{message}");
        assert_eq!(
            index.answer(Question::AllExtensionNumbersOfType("ext.Base")),
            Answer::NoExtensionNumbers
        );
        assert!(matches!(
            index.answer(Question::Nothing),
            Answer::Error {
                code: Code::InvalidArgument,
                ..
            }
        ));
    }

    #[test]
    fn a_file_registered_twice_keeps_its_first_bytes() {
        use prost_types::FileDescriptorSet;
        let file = |package: &str| FileDescriptorProto {
            name: Some("same.proto".to_owned()),
            package: Some(package.to_owned()),
            ..FileDescriptorProto::default()
        };
        let first = FileDescriptorSet {
            file: vec![file("first")],
        }
        .encode_to_vec();
        let second = FileDescriptorSet {
            file: vec![file("second")],
        }
        .encode_to_vec();
        let index = ReflectionIndex::new(Vec::new(), &[&first, &second]).expect("builds");
        assert_eq!(
            file_of(&index.answer(Question::FileByFilename("same.proto"))).package(),
            "first"
        );
    }

    #[test]
    fn files_are_served_with_the_bytes_they_were_registered_with() {
        // A field prost_types does not know (number 999 in FileDescriptorProto) survives.
        let mut file = FileDescriptorProto {
            name: Some("unknown-field.proto".to_owned()),
            ..FileDescriptorProto::default()
        }
        .encode_to_vec();
        prost::encoding::string::encode(999, &"kept".to_owned(), &mut file);
        let mut set = Vec::new();
        prost::encoding::bytes::encode(1, &file, &mut set);
        let index = ReflectionIndex::new(Vec::new(), &[&set]).expect("builds");
        assert_eq!(
            index.answer(Question::FileByFilename("unknown-field.proto")),
            Answer::File(&file)
        );
    }

    #[test]
    fn a_descriptor_set_that_does_not_decode_is_refused() {
        let error = ReflectionIndex::new(Vec::new(), &[b"\x0a\xff"]).expect_err("truncated");
        assert!(
            format!("{error:#}").contains("descriptor set 0"),
            "{error:#}"
        );
    }

    #[test]
    fn responses_carry_the_request_and_its_host_and_both_versions_answer_alike() {
        use tonic_reflection::pb::v1alpha;
        let index = server_index();
        let requests = [
            request(Some(MessageRequest::ListServices(String::new()))),
            symbol_request("fairrank.v1.Ranker"),
            symbol_request("fairrank.v1.Nope"),
            request(Some(MessageRequest::FileByFilename(
                "fairrank/v1/common.proto".to_owned(),
            ))),
            request(Some(MessageRequest::FileByFilename(
                "nope.proto".to_owned(),
            ))),
            request(Some(MessageRequest::FileContainingExtension(
                v1::ExtensionRequest {
                    containing_type: "fairrank.v1.RankRequest".to_owned(),
                    extension_number: 7,
                },
            ))),
            request(Some(MessageRequest::AllExtensionNumbersOfType(
                "fairrank.v1.RankRequest".to_owned(),
            ))),
            request(None),
        ];
        let mut codes = Vec::new();
        for request in requests {
            let response = V1::respond(&index, request.clone());
            assert_eq!(response.valid_host, "test-host");
            assert_eq!(response.original_request.as_ref(), Some(&request));
            codes.push(error_code(&response));
            // v1alpha's messages have the same fields and numbers as v1's.
            let request_v1alpha =
                v1alpha::ServerReflectionRequest::decode(request.encode_to_vec().as_slice())
                    .expect("the same wire format");
            let response_v1alpha = V1alpha::respond(&index, request_v1alpha);
            assert_eq!(
                response_v1alpha.encode_to_vec(),
                response.encode_to_vec(),
                "{request:?}"
            );
        }
        assert_eq!(
            codes,
            [None, None, Some(5), None, Some(5), Some(12), None, Some(3)]
        );
    }

    /// A conversation of protocol v1 over `requests`, never stopped (the sender lives as
    /// long as the test).
    fn conversation<Requests>(
        requests: Requests,
        stop: &watch::Receiver<bool>,
    ) -> Conversation<V1, Requests> {
        Conversation::new(requests, Arc::new(server_index()), stop.clone())
    }

    #[tokio::test]
    async fn a_conversation_answers_errors_in_the_stream_and_goes_on() {
        use tokio_stream::StreamExt as _;
        let (_stop_sender, stop) = watch::channel(false);
        let requests = [
            symbol_request("fairrank.v1.Nope"),
            request(Some(MessageRequest::FileByFilename(
                "nope.proto".to_owned(),
            ))),
            request(Some(MessageRequest::ListServices(String::new()))),
            symbol_request("fairrank.v1.RankRequest"),
        ];
        let answers: Vec<_> = conversation(tokio_stream::iter(requests.map(Ok)), &stop)
            .collect()
            .await;
        assert_eq!(answers.len(), 4, "{answers:?}");
        let answers: Vec<_> = answers
            .into_iter()
            .map(|answer| answer.expect("an answer, not a status"))
            .collect();
        assert_eq!(error_code(&answers[0]), Some(Code::NotFound as i32));
        assert_eq!(error_code(&answers[1]), Some(Code::NotFound as i32));
        assert!(matches!(
            &answers[2].message_response,
            Some(MessageResponse::ListServicesResponse(list)) if list.service.len() == 5
        ));
        match &answers[3].message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                assert_eq!(files.file_descriptor_proto.len(), 1);
                let file = FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
                    .expect("a descriptor");
                assert_eq!(file.name(), "fairrank/v1/ranker.proto");
            }
            other => panic!("a file expected, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_conversation_reads_a_request_only_when_its_answer_is_asked_for() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio_stream::StreamExt as _;
        let (_stop_sender, stop) = watch::channel(false);
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&taken);
        // An endless client: the conversation must not run ahead of its reader.
        let requests = tokio_stream::iter(0..).map(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
            Ok(symbol_request("fairrank.v1.Ranker"))
        });
        let mut conversation = conversation(requests, &stop);
        for answered in 1..=3 {
            let answer = conversation.next().await.expect("an answer");
            assert!(answer.is_ok());
            assert_eq!(taken.load(Ordering::Relaxed), answered);
        }
    }

    #[tokio::test]
    async fn a_conversation_ends_when_the_server_stops() {
        use tokio_stream::StreamExt as _;
        let (stop_sender, stop) = watch::channel(false);
        // An idle client that never ends its side.
        let requests = tokio_stream::pending::<Result<v1::ServerReflectionRequest, Status>>();
        let mut idle = conversation(requests, &stop);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), idle.next()).await;
        assert!(waiting.is_err(), "an idle conversation waits");
        stop_sender.send(true).expect("the conversation watches");
        let status = idle
            .next()
            .await
            .expect("a last item")
            .expect_err("a status");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(idle.next().await.is_none());
        // A stream opened during the drain ends at once.
        let mut late = conversation(tokio_stream::pending(), &stop);
        assert_eq!(
            late.next()
                .await
                .expect("a status")
                .expect_err("a status")
                .code(),
            Code::Unavailable
        );
    }

    /// The client's side fails as tonic's decoder says it (a message above the limit, one
    /// that does not decode): the stream ends with that status and the reason every
    /// fairrank error carries, a message above the limit as every service refuses it
    /// (RESOURCE_EXHAUSTED, [`super::super::errors::request_too_large`]), the other with
    /// tonic's code and message.
    #[tokio::test]
    async fn a_conversation_ends_with_the_status_of_a_failed_client_side() {
        use api::fairrank::v1::ErrorReason;
        use tokio_stream::StreamExt as _;
        let (_stop_sender, stop) = watch::channel(false);
        let undecodable = Status::internal("failed to decode Protobuf message: invalid varint");
        for (failure, expected, reason) in [
            (
                Status::out_of_range(
                    "Error, decoded message length too large: found 9 bytes, the limit is: 8 \
                     bytes",
                ),
                super::super::errors::request_too_large(Some(9), 8),
                ErrorReason::LimitExceeded,
            ),
            (undecodable.clone(), undecodable, ErrorReason::InvalidField),
        ] {
            let requests = tokio_stream::iter([
                Ok(symbol_request("fairrank.v1.Ranker")),
                Err(failure.clone()),
                Ok(symbol_request("fairrank.v1.Ranker")),
            ]);
            let answers: Vec<_> = conversation(requests, &stop).collect().await;
            assert_eq!(answers.len(), 2, "{answers:?}");
            assert!(answers[0].is_ok());
            let status = answers[1].as_ref().expect_err("the status");
            assert_eq!(
                (status.code(), status.message()),
                (expected.code(), expected.message())
            );
            assert_eq!(api::status::error_reason(status), reason, "{status:?}");
        }
    }

    /// Every full name of an enum value in its enum's scope, and of an extension, in the
    /// encoded descriptor sets: the symbols this index adds to tonic-reflection's.
    fn added_symbols(sets: &[&[u8]]) -> std::collections::HashSet<String> {
        fn join(scope: &str, name: &str) -> String {
            if scope.is_empty() {
                name.to_owned()
            } else {
                format!("{scope}.{name}")
            }
        }
        fn walk(
            scope: &str,
            messages: &[DescriptorProto],
            enums: &[EnumDescriptorProto],
            extensions: &[prost_types::FieldDescriptorProto],
            added: &mut std::collections::HashSet<String>,
        ) {
            for enumeration in enums {
                for value in &enumeration.value {
                    added.insert(join(scope, value.name()));
                }
            }
            for extension in extensions {
                added.insert(join(scope, extension.name()));
            }
            for message in messages {
                let name = join(scope, message.name());
                walk(
                    &name,
                    &message.nested_type,
                    &message.enum_type,
                    &message.extension,
                    added,
                );
            }
        }
        let mut added = std::collections::HashSet::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(*set).expect("a descriptor set");
            for file in &set.file {
                walk(
                    file.package(),
                    &file.message_type,
                    &file.enum_type,
                    &file.extension,
                    &mut added,
                );
            }
        }
        added
    }

    /// tonic-reflection's v1 service, configured as this server configured it before it
    /// had its own reflection (`Builder` with the same names and descriptor sets), on a
    /// loopback port; its address.
    async fn tonic_reflection_server(api_descriptors: &[u8]) -> std::net::SocketAddr {
        let names = SERVED.iter().copied().chain([
            tonic_health::pb::health_server::SERVICE_NAME,
            tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
            tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
        ]);
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api_descriptors)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        let service = names
            .fold(builder, |builder, name| builder.with_service_name(name))
            .build_v1()
            .expect("tonic-reflection builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                ),
        );
        addr
    }

    /// For every file and symbol this index knows and the list, the answer is the one
    /// tonic-reflection gave, byte for byte, unless tonic-reflection did not know the
    /// symbol: then it is one this index adds (enum values in their enum's scope,
    /// extensions). Unknown names: tonic-reflection's NOT_FOUND, as an `error_response`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_answers_are_tonic_reflections_where_it_answered() {
        use v1::server_reflection_client::ServerReflectionClient;
        let api = api_descriptors();
        let index = ReflectionIndex::of_server(&SERVED, &api).expect("the index builds");
        let addr = tonic_reflection_server(&api).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect()
            .await
            .expect("tonic-reflection answers");
        let mut client = ServerReflectionClient::new(channel);
        let mut requests = vec![
            request(Some(MessageRequest::ListServices(String::new()))),
            symbol_request("fairrank.v1.Nope"),
            request(Some(MessageRequest::FileByFilename(
                "nope.proto".to_owned(),
            ))),
            request(Some(MessageRequest::AllExtensionNumbersOfType(
                "fairrank.v1.RankRequest".to_owned(),
            ))),
        ];
        requests.extend(
            index
                .files
                .keys()
                .map(|name| request(Some(MessageRequest::FileByFilename(name.clone())))),
        );
        requests.extend(index.symbols.keys().map(|symbol| symbol_request(symbol)));
        let added = added_symbols(&[
            &api,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ]);
        let (mut same, mut added_found, mut not_found) = (0, 0, 0);
        for request in requests {
            let ours = V1::respond(&index, request.clone());
            // One stream per request: tonic-reflection ends a stream at its first error.
            let theirs = client
                .server_reflection_info(tokio_stream::iter([request.clone()]))
                .await
                .expect("the stream opens")
                .into_inner()
                .message()
                .await;
            match theirs {
                Ok(Some(theirs)) => {
                    assert_eq!(ours, theirs, "{request:?}");
                    same += 1;
                }
                Err(status) if status.code() == Code::NotFound => {
                    if error_code(&ours) == Some(Code::NotFound as i32) {
                        not_found += 1;
                        continue;
                    }
                    let Some(MessageRequest::FileContainingSymbol(symbol)) =
                        &request.message_request
                    else {
                        panic!("tonic-reflection knew no {request:?}: {ours:?}");
                    };
                    assert!(added.contains(symbol), "{symbol}: {ours:?}");
                    added_found += 1;
                }
                other => panic!("{request:?}: {other:?}"),
            }
        }
        assert!(same > 400, "{same} answers compared");
        assert_eq!(not_found, 2, "the unknown symbol and file");
        assert!(added_found > 10, "{added_found} symbols added");
        eprintln!("{same} answers equal to tonic-reflection's, {added_found} symbols added");
    }
}

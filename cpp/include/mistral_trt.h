/* mistral-trt's embedded runtime: a C ABI over the C++ library (libmistral_trt), for C, C++, Go, Rust, C# or
 * Python (ctypes). It drives an export folder written by `mistral-trt export` through its manifest.json, on
 * onnxruntime's CPU provider. No exception crosses it: a call returns a status, and mtrt_last_error() says why.
 *
 *     mtrt_model* m = mtrt_open("build/onnx/smollm2-135m-instruct-fused-fp32");
 *     if (!m) { fprintf(stderr, "%s\n", mtrt_last_error()); return 2; }
 *     int64_t ids[4096]; size_t n;
 *     mtrt_tokenize(m, MTRT_PROMPT, "Why is the sky blue?", ids, 4096, &n);   (a chat-formatted user message)
 *     mtrt_params p; mtrt_default_params(&p); p.max_new_tokens = 64;          (greedy)
 *     mtrt_generate(m, ids, n, &p, on_token, NULL, NULL, NULL);                (on_token gets each piece of text)
 *     mtrt_close(m);
 *
 * A conversation keeps its KV cache between turns in a session, so each turn is fed from where its prompt differs
 * from what the cache holds (the new messages, not the history):
 *
 *     mtrt_session* s = mtrt_session_open(m);
 *     mtrt_session_append(s, "user", "Why is the sky blue?");
 *     mtrt_session_generate(s, &p, on_token, NULL, &st, NULL);   (the reply is appended to the conversation)
 *     mtrt_session_append(s, "user", "And at sunset?");
 *     mtrt_session_generate(s, &p, on_token, NULL, &st, NULL);   (st.cached_tokens: the history, not fed again)
 *     mtrt_session_close(s);                                      (before mtrt_close)
 *
 * One handle holds one model and generates one sequence at a time (its sessions included); use one handle per
 * thread. */
#ifndef MISTRAL_TRT_H
#define MISTRAL_TRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* status codes */
#define MTRT_OK 0
#define MTRT_INTERNAL 1  /* a bug or the machine (out of memory): the message says what */
#define MTRT_BAD_INPUT 2 /* the export, a parameter or the prompt: the message names it (the CLI's exit code 2) */
#define MTRT_TOO_SMALL 3 /* mtrt_tokenize: the id buffer is too small; *count says how many are needed */

/* what mtrt_tokenize reads */
#define MTRT_PROMPT 0   /* one user message, in the model's chat format (mistral-v1) */
#define MTRT_RAW 1      /* plain text, encoded as the model's tokenizer does (BOS where it adds one) */
#define MTRT_MESSAGES 2 /* a JSON conversation [{"role", "content"}, ...] ending with a user message, or with an
                           assistant message marked "prefix": true (continued) */

typedef struct mtrt_model mtrt_model;

typedef struct mtrt_params {
  int32_t max_new_tokens;   /* >= 1; prompt + new tokens must fit the model's context limit */
  double temperature;       /* 0: greedy (the default) */
  double top_p;             /* (0, 1]; 1: off */
  int32_t top_k;            /* >= 0; 0: off */
  double repetition_penalty; /* > 0; 1: off */
  int32_t use_seed;         /* 1: seed below; 0: a random seed */
  uint64_t seed;
  const char* const* stop;  /* stop strings (UTF-8), not included in the text */
  int32_t stop_count;
  int32_t ignore_eos;       /* 1: generate max_new_tokens even past EOS (benchmarks) */
  int32_t truncate;         /* 1: keep the last tokens of a prompt over the context limit (at least half of it) */
} mtrt_params;

typedef struct mtrt_stats {
  int32_t prompt_tokens;
  int32_t new_tokens;       /* sampled tokens, EOS included */
  double time_to_first_token_s;
  double decode_tokens_per_s;
  int32_t stop_reason;      /* 0 max_new_tokens, 1 EOS, 2 a stop string, 3 the callback asked */
  int32_t cached_tokens;    /* a session's prompt tokens its cache held already, not fed again (0 otherwise) */
} mtrt_stats;

/* Called for each new token with the text it adds (UTF-8, NUL-terminated, possibly empty while a character or a
 * possible stop string is incomplete); id -1 at the very end hands over text held back until then. Return 0 to
 * go on, non-zero to stop. */
typedef int (*mtrt_on_token)(void* user, int64_t id, const char* text, size_t text_len);

const char* mtrt_version(void);
/* The last error of a call on this thread that failed (valid until the next failing call on this thread). */
const char* mtrt_last_error(void);
void mtrt_default_params(mtrt_params* params);

/* Open an export folder: the manifest is checked, every file's sha256 (remembered while the file is unchanged,
 * as the Python runtime does), the ONNX graph against the manifest. NULL on failure. */
mtrt_model* mtrt_open(const char* export_dir);
void mtrt_close(mtrt_model* model);

/* Model facts from the manifest: vocab_size, max_context, num_layers; -1 for an unknown key. */
int64_t mtrt_info(const mtrt_model* model, const char* key);

int mtrt_tokenize(mtrt_model* model, int kind, const char* input, int64_t* ids, size_t capacity, size_t* count);
/* Decode ids to text (special tokens skipped) into buf (NUL-terminated); *len: the text's length in bytes. */
int mtrt_decode(mtrt_model* model, const int64_t* ids, size_t n, char* buf, size_t capacity, size_t* len);

/* Generate a reply to prompt[0..prompt_len). on_token, stats and token_times (max_new_tokens doubles: seconds
 * from the call to each new token) may be NULL. */
int mtrt_generate(mtrt_model* model, const int64_t* prompt, size_t prompt_len, const mtrt_params* params,
                  mtrt_on_token on_token, void* user, mtrt_stats* stats, double* token_times);

/* Sessions: a conversation (messages) or a stream of ids, and the KV cache of what was last generated. The cache
 * is kept with the fused graph (export --graph fused), sized for the model's context and filled as it is used; with
 * the portable graph each turn is fed whole (cached_tokens 0). A session holds messages or ids, not both. */
typedef struct mtrt_session mtrt_session;

mtrt_session* mtrt_session_open(mtrt_model* model); /* NULL on failure */
/* Add a message: role "system", "user" or "assistant" (UTF-8 content). */
int mtrt_session_append(mtrt_session* session, const char* role, const char* content);
/* Add ids (for models whose tokenizer the C++ runtime cannot encode, or a prompt already formatted). */
int mtrt_session_append_ids(mtrt_session* session, const int64_t* ids, size_t n);
/* Generate a reply to the session so far (messages: formatted in the model's chat format, ending with a user
 * message), as mtrt_generate does; the reply is then part of the session (an assistant message, or its ids).
 * On failure the session is unchanged. */
int mtrt_session_generate(mtrt_session* session, const mtrt_params* params, mtrt_on_token on_token, void* user,
                          mtrt_stats* stats, double* token_times);
/* Forget the conversation and the cache (the next generate starts cold). */
int mtrt_session_reset(mtrt_session* session);
void mtrt_session_close(mtrt_session* session);

#ifdef __cplusplus
}
#endif

#endif

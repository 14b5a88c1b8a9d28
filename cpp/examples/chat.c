/* A conversation through a session (docs/cpp.md): each turn is fed from where its prompt differs from what the
 * session's KV cache holds, so a turn pays for its new message, not the history.
 *   chat EXPORT_DIR "Hi!" "Tell me more." "Thanks."     one user message per turn, greedy replies */
#include <mistral_trt.h>
#include <stdio.h>

static int on_token(void* user, int64_t id, const char* text, size_t len) {
  (void)user, (void)id;
  fwrite(text, 1, len, stdout);
  fflush(stdout);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 3) return fprintf(stderr, "usage: chat EXPORT_DIR MESSAGE [MESSAGE ...]\n"), 2;
  mtrt_model* m = mtrt_open(argv[1]);
  if (!m) return fprintf(stderr, "chat: error: %s\n", mtrt_last_error()), 2;
  mtrt_session* s = mtrt_session_open(m);
  int rc = s ? MTRT_OK : MTRT_BAD_INPUT;
  mtrt_params p;
  mtrt_default_params(&p); /* greedy */
  p.max_new_tokens = 24;
  for (int turn = 2; rc == MTRT_OK && turn < argc; ++turn) {
    mtrt_stats st;
    printf("> %s\n", argv[turn]);
    rc = mtrt_session_append(s, "user", argv[turn]);
    if (rc == MTRT_OK) rc = mtrt_session_generate(s, &p, on_token, NULL, &st, NULL);
    if (rc == MTRT_OK)
      printf("\n[%d prompt tokens, %d from the cache, %d new, first token in %.3f s]\n", st.prompt_tokens,
             st.cached_tokens, st.new_tokens, st.time_to_first_token_s);
  }
  if (rc != MTRT_OK) fprintf(stderr, "chat: error: %s\n", mtrt_last_error());
  mtrt_session_close(s);
  mtrt_close(m);
  return rc;
}

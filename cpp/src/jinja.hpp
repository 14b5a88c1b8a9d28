// The part of Jinja that Hugging Face chat templates use, rendered as transformers renders them (jinja2 with
// trim_blocks, lstrip_blocks and loop controls; runtime/chat.py's render_template), so the C++ runtime formats a
// conversation for a `template` chat format itself:
//
//   std::string text = jinja::render(template_text, {{"messages", messages}, {"add_generation_prompt", true},
//                                                    {"bos_token", "<s>"}, {"eos_token", "</s>"}});
//
// Statements: if / elif / else, for (with `loop`, an `if` filter, else, break, continue, two-name unpacking), set
// (a name, or an attribute of a namespace()), comments and whitespace control. Expressions: literals, lists, dicts,
// names, attributes, subscripts and slices, calls of raise_exception / namespace / range and of the string and dict
// methods templates call, filters (trim, length, upper, lower, capitalize, title, tojson, string, int, first, last,
// join, default, replace, items, reverse, list, safe), tests (defined, none, string, number, mapping, iterable,
// sequence, boolean, true, false, even, odd), not / and / or, comparisons, in, `~`, + - * / // %, and a if b else c.
// Anything else is an Error naming it ("chat template: ..."): refused, never guessed.
#pragma once

#include <string>

#include "common.hpp"

namespace mtrt::jinja {

std::string render(const std::string& source, const json& context);

}  // namespace mtrt::jinja

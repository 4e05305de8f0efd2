#!/usr/bin/env python3
"""LangChain's ChatAnthropic against a running semantic server: `.stream()` must report the
same input tokens as `.invoke()` (LangChain reads streamed usage from `message_delta`).

Usage: langchain_check.py BASE_URL. Prints the numbers; exits 1 when they differ or are 0.
"""

import sys

from langchain_anthropic import ChatAnthropic
from langchain_core.messages import HumanMessage, SystemMessage

base = sys.argv[1].rstrip("/")
llm = ChatAnthropic(
    model="local",
    base_url=base,
    api_key="sk-local",
    max_tokens=16,
    temperature=0,
    max_retries=0,
)
messages = [
    SystemMessage("You are a careful coding agent. Answer briefly."),
    HumanMessage("Name one prime number."),
]
invoked = llm.invoke(messages).usage_metadata
streamed = None
for chunk in llm.stream(messages):
    streamed = chunk if streamed is None else streamed + chunk
streamed = streamed.usage_metadata if streamed is not None else None
print(f"invoke usage: {invoked}")
print(f"stream usage: {streamed}")
ok = (
    invoked is not None
    and streamed is not None
    and invoked["input_tokens"] > 0
    and streamed["input_tokens"] == invoked["input_tokens"]
    and streamed["output_tokens"] > 0
)
if not ok:
    print("FAIL  ChatAnthropic .stream() input_tokens differ from .invoke()")
    sys.exit(1)
print("ok    ChatAnthropic .stream() reports the .invoke() input tokens")

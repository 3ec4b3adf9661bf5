"""The templates of revision ``lf-0.9``: LLaMA-Factory 0.9.5's text templates, for LLaMA-Factory 0.5's names it
still has and for newer model families.

Slots and default system prompts are transcribed from LLaMA-Factory 0.9.5; see
:func:`templates.define` for the slots a template leaves out.
"""

from chipspan.data.template_lf05 import VICUNA_SYSTEM, XUANYUAN_SYSTEM
from chipspan.data.templates import BOS, EOS, Token, define


def _lf(name: str, **fields):
    return define("lf-0.9", name, **fields)


def _chatml(name: str, **fields):
    """A ChatML template: ``<|im_start|>role\\n...<|im_end|>\\n`` turns."""
    return _lf(
        name,
        user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n",),
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        **fields,
    )


QWEN_TOOLS = dict(
    function=("{{content}}<|im_end|>\n",),
    observation=(
        "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    ),
    tool_format="qwen",
    stop_words=("<|im_end|>",),
    replace_eos=True,
)
GEMMA = dict(
    user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    assistant=("{{content}}<end_of_turn>\n",),
    system=("{{content}}\n\n",),
    observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,),
    system_in_user=True,
)
LLAMA2 = dict(
    user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",), system_in_user=True
)
MISTRAL_TOOLS = dict(tool_format="mistral", prefix=(BOS,))

LF09_TEMPLATES = [
    _lf(
        "alpaca",
        user=("### Instruction:\n{{content}}\n\n### Response:\n",),
        assistant=("{{content}}", EOS, "\n\n"),
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
        ),
    ),
    _lf(
        "chatglm3",
        user=(Token("<|user|>"), "\n", "{{content}}", Token("<|assistant|>")),
        assistant=("\n", "{{content}}"),
        system=(Token("<|system|>"), "\n", "{{content}}"),
        function=("{{content}}",),
        observation=(Token("<|observation|>"), "\n", "{{content}}", Token("<|assistant|>")),
        tool_format="glm4",
        prefix=(Token("[gMASK]"), Token("sop")),
        stop_words=("<|user|>", "<|observation|>"),
        efficient_eos=True,
    ),
    _chatml(
        "chatml",
        observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        stop_words=("<|im_end|>", "<|im_start|>"),
        replace_eos=True,
    ),
    _lf(
        "cohere",
        user=(
            "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"
            "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        ),
        system=("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",),
        prefix=(BOS,),
    ),
    _lf("deepseek", user=("User: {{content}}\n\nAssistant:",), system=("{{content}}\n\n",), prefix=(BOS,)),
    _lf("deepseek3", user=("<｜User｜>{{content}}<｜Assistant｜>",), prefix=(BOS,)),
    _lf(
        "deepseekcoder",
        user=("### Instruction:\n{{content}}\n### Response:",),
        assistant=("\n{{content}}\n<|EOT|>\n",),
        prefix=(BOS,),
        default_system=(
            "You are an AI programming assistant, utilizing the DeepSeek Coder model, "
            "developed by DeepSeek Company, and you only answer questions related to computer science. "
            "For politically sensitive questions, security and privacy issues, "
            "and other non-computer science questions, you will refuse to answer.\n"
        ),
    ),
    _lf(
        "default",
        user=("Human: {{content}}", EOS, "\nAssistant:"),
        assistant=("{{content}}", EOS, "\n"),
        system=("System: {{content}}", EOS, "\n"),
    ),
    _lf("empty", assistant=("{{content}}",)),
    _lf("falcon", user=("User: {{content}}\nFalcon:",), assistant=("{{content}}\n",), efficient_eos=True),
    _lf("gemma", **GEMMA, stop_words=("<end_of_turn>",), replace_eos=True),
    _lf("gemma2", **GEMMA, stop_words=("<eos>", "<end_of_turn>"), efficient_eos=True),
    _lf(
        "intern2",
        user=("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
        assistant=("{{content}}<|im_end|>\n",),
        system=("<|im_start|>system\n{{content}}<|im_end|>\n",),
        prefix=(BOS,),
        default_system=(
            "You are an AI assistant whose name is InternLM (书生·浦语).\n"
            "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
            "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
            "- InternLM (书生·浦语) can understand and communicate fluently in the language "
            "chosen by the user such as English and 中文."
        ),
        stop_words=("<|im_end|>",),
    ),
    _lf("llama2", **LLAMA2),
    _lf("llama2_zh", **LLAMA2, default_system="You are a helpful assistant. 你是一个乐于助人的助手。"),
    _lf(
        "llama3",
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        assistant=("{{content}}<|eot_id|>",),
        system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
        function=("{{content}}<|eot_id|>",),
        observation=(
            "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        tool_format="llama3",
        prefix=(BOS,),
        stop_words=("<|eot_id|>", "<|eom_id|>"),
        replace_eos=True,
    ),
    _lf(
        "llama4",
        user=("<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n",),
        assistant=("{{content}}<|eot|>",),
        system=("<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",),
        function=("{{content}}<|eot|>",),
        observation=(
            "<|header_start|>ipython<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n",
        ),
        tool_format="llama3",
        prefix=(BOS,),
        stop_words=("<|eot|>", "<|eom|>"),
        replace_eos=True,
    ),
    _lf(
        "ministral",
        user=("[INST]{{content}}[/INST]",),
        system=("{{content}}\n\n",),
        function=("[TOOL_CALLS]{{content}}", EOS),
        observation=('[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]',),
        system_in_user=True,
        **MISTRAL_TOOLS,
    ),
    _lf(
        "mistral",
        user=("[INST] {{content}}[/INST]",),
        assistant=(" {{content}}", EOS),
        system=("{{content}}\n\n",),
        function=("[TOOL_CALLS] {{content}}", EOS),
        observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
        system_in_user=True,
        **MISTRAL_TOOLS,
    ),
    _lf(
        "mistral_small",
        user=("[INST]{{content}}[/INST]",),
        system=("[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]",),
        function=("[TOOL_CALLS]{{content}}", EOS),
        observation=('[TOOL_RESULTS]{"content": {{content}}}[/TOOL_RESULTS]',),
        **MISTRAL_TOOLS,
    ),
    _lf("openchat", user=("GPT4 Correct User: {{content}}", EOS, "GPT4 Correct Assistant:"), prefix=(BOS,)),
    _lf(
        "phi",
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
        assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",),
        stop_words=("<|end|>",),
        replace_eos=True,
    ),
    _lf(
        "phi4",
        user=("<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",),
        assistant=("{{content}}<|im_end|>",),
        system=("<|im_start|>system<|im_sep|>{{content}}<|im_end|>",),
        stop_words=("<|im_end|>",),
        replace_eos=True,
    ),
    _chatml(
        "qwen", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", **QWEN_TOOLS
    ),
    _chatml("qwen3", thinking=True, **QWEN_TOOLS),
    _chatml("qwen3_nothink", **QWEN_TOOLS),
    _chatml("smollm", stop_words=("<|im_end|>",)),
    _chatml(
        "smollm2",
        stop_words=("<|im_end|>",),
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
    ),
    _lf(
        "solar",
        user=("### User:\n{{content}}\n\n### Assistant:\n",),
        system=("### System:\n{{content}}\n\n",),
        efficient_eos=True,
    ),
    _lf(
        "starchat",
        user=("<|user|>\n{{content}}<|end|>\n<|assistant|>",),
        assistant=("{{content}}<|end|>\n",),
        system=("<|system|>\n{{content}}<|end|>\n",),
        stop_words=("<|end|>",),
    ),
    _lf("vicuna", user=("USER: {{content}} ASSISTANT:",), default_system=VICUNA_SYSTEM),
    _lf("xuanyuan", user=("Human: {{content}} Assistant:",), default_system=XUANYUAN_SYSTEM),
    _chatml("yi", stop_words=("<|im_end|>",)),
    _lf("yuan", user=("{{content}}", Token("<sep>")), assistant=("{{content}}<eod>\n",), stop_words=("<eod>",)),
    _lf(
        "zephyr",
        user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
        system=("<|system|>\n{{content}}", EOS),
        default_system="You are Zephyr, a helpful assistant.",
    ),
]

"""Chinese and Arabic technical paragraphs that mix in Latin terms (the texts of issue 24 item 4).

A technical handbook translated into Chinese or Arabic keeps its commands, product names, file
paths and acronyms in Latin letters. CLD3 answers such paragraphs with a language of another script
(Marathi, Swedish, Korean...) at high confidence. The sentences below were written for this test
(none copied), each with ``{}`` slots that take Latin terms; :func:`mixed_script_texts` joins 2-5 of
them into a paragraph.
"""

from __future__ import annotations

import random

TERMS = (
    "PostgreSQL", "max_connections", "shared_buffers", "pg_hba.conf", "kubectl apply -f deployment.yaml", "Pod",
    "CrashLoopBackOff", "Docker", "Kubernetes", "Nginx", "proxy_pass", "systemctl restart nginx", "/etc/nginx/nginx.conf",
    "Python 3.11", "pip install numpy", "pandas.DataFrame", "df.groupby('key').sum()", "GPU", "batch_size",
    "gradient_checkpointing", "bf16", "API", "JSON", "HTTP 404", "TLS", "SSH", "git commit -m \"fix\"", "git push origin main",
    "README.md", "Settings > General > About", "iOS 17", "Android", "USB-C", "Wi-Fi", "Linux", "CUDA 12.4", "OpenSSL",
    "localhost:8080", "C:\\Program Files\\App", "Ctrl+Shift+P", "VS Code", "YAML", "cron", "SELECT * FROM users;",
)

ZH = (
    "使用 {} 部署时，请先运行 {}，然后检查 {} 的状态。",
    "如果出现 {} 错误，请查看日志并确认 {} 已正确配置。",
    "在 {} 中，可以通过修改 {} 来提高性能，但需要重新启动服务。",
    "默认情况下，{} 会读取 {} 文件中的设置。",
    "安装完成后，执行 {} 命令以验证版本是否正确。",
    "注意：在生产环境中不要直接修改 {}，应先在测试环境中验证。",
    "我们建议将 {} 设置为服务器内存的四分之一左右，并定期监控 {} 的使用情况。",
    "当显存不足时，可以减小 {}，或者启用 {} 和 {}。",
    "请打开 {}，找到 {} 选项，然后点击“保存”。",
    "该功能依赖于 {} 和 {}，旧版本的系统可能无法正常运行。",
    "用户可以通过 {} 访问管理界面，登录后即可查看所有连接。",
    "更新之前，请备份 {} 并记录当前的 {} 配置。",
    "本章介绍如何使用 {} 编写脚本，并通过 {} 定时执行。",
    "如果 {} 返回 {}，说明请求的资源不存在。",
)

AR = (
    "عند استخدام {} يجب أولاً تشغيل الأمر {} ثم التحقق من حالة {}.",
    "إذا ظهر الخطأ {} فراجع السجلات وتأكد من إعداد {} بشكل صحيح.",
    "يمكنك تحسين الأداء في {} عن طريق تعديل {} ثم إعادة تشغيل الخدمة.",
    "بشكل افتراضي يقرأ {} الإعدادات من الملف {}.",
    "بعد اكتمال التثبيت نفّذ الأمر {} للتأكد من أن الإصدار صحيح.",
    "ملاحظة: لا تعدّل {} مباشرة في بيئة الإنتاج، بل اختبر التغيير أولاً.",
    "ننصح بضبط {} على نحو ربع ذاكرة الخادم ومراقبة استخدام {} بانتظام.",
    "عند نفاد ذاكرة البطاقة يمكنك تقليل {} أو تفعيل {} و {}.",
    "افتح {} ثم ابحث عن الخيار {} واضغط على حفظ.",
    "تعتمد هذه الميزة على {} و {}، وقد لا تعمل على الأنظمة القديمة.",
    "يستطيع المستخدم الوصول إلى واجهة الإدارة عبر {} ورؤية جميع الاتصالات بعد تسجيل الدخول.",
    "قبل التحديث احتفظ بنسخة احتياطية من {} وسجّل إعدادات {} الحالية.",
    "يشرح هذا الفصل كيفية كتابة البرامج النصية باستخدام {} وتشغيلها دورياً عبر {}.",
    "إذا أعاد {} الرمز {} فهذا يعني أن المورد المطلوب غير موجود.",
)


# Glossary entries of a database handbook: the Latin term, then its explanation (written for this test).
GLOSSARY = (
    ("pg_dump", "逻辑备份工具", "الأداة الرسمية للنسخ الاحتياطي المنطقي"), ("WAL", "预写日志", "سجل الكتابة المسبقة"),
    ("max_connections", "最大连接数", "الحد الأقصى للاتصالات"), ("OID", "对象标识符", "معرّف الكائن في الجدول"),
    ("TOAST", "超大属性存储技术", "تخزين القيم الكبيرة"), ("work_mem", "每次排序操作使用的内存", "ذاكرة العمل لكل عملية فرز"),
    ("shared_buffers", "共享缓冲区大小", "حجم المخازن المؤقتة المشتركة"), ("GIN", "通用倒排索引", "الفهرس المقلوب العام"),
    ("JSONB", "二进制 JSON 类型", "نوع JSON الثنائي"), ("COPY", "从 CSV 文件复制数据", "نسخ البيانات من ملف CSV"),
    ("libpq", "C 语言客户端库", "مكتبة العميل بلغة C"), ("VACUUM", "回收死元组占用的空间", "استعادة المساحة التي تشغلها الصفوف الميتة"),
    ("pg_hba.conf", "客户端认证配置文件", "ملف إعداد مصادقة العملاء"), ("B-tree", "默认的索引类型", "نوع الفهرس الافتراضي"),
    ("checkpoint", "把脏页写入磁盘的时间点", "نقطة كتابة الصفحات المعدلة إلى القرص"), ("MVCC", "多版本并发控制", "التحكم في التزامن متعدد الإصدارات"),
    ("autovacuum", "自动清理守护进程", "عملية التنظيف التلقائي"), ("tablespace", "存放数据文件的目录", "المجلد الذي تحفظ فيه ملفات البيانات"),
    ("hot standby", "只读的备用服务器", "خادم احتياطي للقراءة فقط"), ("EXPLAIN", "显示查询计划", "عرض خطة تنفيذ الاستعلام"),
    ("psql", "交互式终端", "الطرفية التفاعلية"), ("pg_stat_activity", "当前会话的视图", "عرض الجلسات الحالية"),
    ("SERIALIZABLE", "最严格的隔离级别", "أشد مستويات العزل"), ("CTE", "公用表表达式", "تعبير الجدول المشترك"),
)


def glossary_entries(lang: str) -> list[str]:
    """``"TERM explanation"`` lines of :data:`GLOSSARY` in ``lang`` (``"zh"`` or ``"ar"``)."""
    i = {"zh": 1, "ar": 2}[lang]
    return [f"{g[0]} {g[i]}" for g in GLOSSARY]


def mixed_script_texts(lang: str, n: int = 1000, seed: int = 0) -> list[str]:
    """``n`` paragraphs in ``lang`` (``"zh"`` or ``"ar"``) of 2-5 sentences, each slot a Latin term."""
    sentences = {"zh": ZH, "ar": AR}[lang]
    rng = random.Random(seed)
    sep = "" if lang == "zh" else " "
    out = []
    for _ in range(n):
        k = rng.randint(2, 5)
        parts = [s.format(*(rng.choice(TERMS) for _ in range(s.count("{}")))) for s in rng.sample(sentences, k)]
        out.append(sep.join(parts))
    return out
